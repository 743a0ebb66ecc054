"""check_xapi's command line: a Nagios-convention check of Esup-Pod's xAPI pipeline.

Per Redis broker (the frontal's ``redis-server@xapi``): the queue, the age of its oldest
statement, what the workers hold in flight, the worker nodes alive, the dead letters and
the time since the last batch the LRS accepted; and the LRS itself (``GET statements?limit=1``).
One status line, performance data, exit code 0/1/2/3 (roles/xapi_ops README, "check_xapi").
With ``--prometheus FILE``, the same readings plus the worker's counters as a file of
Prometheus' text format, for node_exporter's textfile collector (roles/xapi_ops README,
"Metrics").

Standard library only (Python 3.11 and later): roles/xapi_ops installs the package's
stdlib-only modules and a launcher on hosts without the worker's venv. It reads its JSON
configuration file and talks to the network, nothing else.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from .config import DEFAULT_CONFIG, METRICS, Config, ConfigError, check_pair, load_config
from .nagios import mask, run
from .prometheus import prometheus_text, write_textfile
from .states import OK, UNKNOWN

VERSION = "1.0.0"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"XAPI UNKNOWN - usage: {message}")
        sys.exit(UNKNOWN)


def build_parser() -> Parser:
    parser = Parser(
        prog="check_xapi",
        description="Check Esup-Pod's xAPI pipeline: Redis broker(s), worker nodes, dead "
        "letters, LRS. Nagios plugin convention: one status line, exit 0 OK, 1 WARNING, "
        "2 CRITICAL, 3 UNKNOWN.",
    )
    parser.add_argument(
        "-C", "--config", default=DEFAULT_CONFIG, help=f"JSON configuration ({DEFAULT_CONFIG})"
    )
    parser.add_argument("--metric", choices=METRICS, help="check this metric only")
    parser.add_argument(
        "-w", "--warning", type=int, help="warning threshold of --metric (an integer)"
    )
    parser.add_argument(
        "-c", "--critical", type=int, help="critical threshold of --metric (an integer)"
    )
    parser.add_argument(
        "-t", "--timeout", type=float, help="seconds per connection and per read (default 5)"
    )
    parser.add_argument(
        "--prometheus",
        metavar="FILE",
        help="write the metrics in Prometheus' text format to FILE (node_exporter's textfile "
        "collector; '-' for standard output) instead of checking",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration only, without connecting (the role's validate:)",
    )
    parser.add_argument("-V", "--version", action="version", version=f"check_xapi {VERSION}")
    return parser


def configure(args: argparse.Namespace) -> Config:
    given = args.warning is not None or args.critical is not None
    if given and args.metric is None:
        raise ConfigError("-w/--warning and -c/--critical need --metric")
    if given and args.metric == "lrs":
        raise ConfigError("--metric lrs takes no thresholds")
    if args.timeout is not None and (not math.isfinite(args.timeout) or args.timeout <= 0):
        raise ConfigError("-t/--timeout must be a number greater than 0")
    config = load_config(args.config)
    if args.timeout is not None:
        config.timeout = args.timeout
    if given:
        warn, crit = config.thresholds[args.metric]
        warn = float(args.warning) if args.warning is not None else warn
        crit = float(args.critical) if args.critical is not None else crit
        check_pair(args.metric, warn, crit, "-w/-c")
        config.thresholds[args.metric] = (warn, crit)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    secrets: list[str] = []
    try:
        args = build_parser().parse_args(argv)
        config = configure(args)
        secrets = config.secrets()
        if args.check_config:
            print(f"XAPI OK - configuration {args.config} is valid")
            return OK
        if args.prometheus:
            text = mask(prometheus_text(config), secrets)
            if args.prometheus == "-":
                sys.stdout.write(text)
            else:
                write_textfile(args.prometheus, text)
            return OK
        report = run(config, args.metric)
        line, code = report.line(secrets), report.state
    except ConfigError as exc:
        line, code = mask(f"XAPI UNKNOWN - configuration: {exc}", secrets), UNKNOWN
    except Exception as exc:
        line, code = f"XAPI UNKNOWN - unexpected error: {type(exc).__name__}", UNKNOWN
    print(line)
    return code


def entry() -> None:
    """The command: ``main``'s exit code; an interruption is UNKNOWN too."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("XAPI UNKNOWN - interrupted")
        sys.exit(UNKNOWN)


if __name__ == "__main__":
    entry()
