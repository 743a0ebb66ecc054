"""Writes prometheus/xapi.rules.yml, the Prometheus alert rules of the frontals' metrics.

The thresholds are check_xapi's own defaults (its DEFAULT_THRESHOLDS) and the dead letters'
window is roles/xapi_ops' default (xapi_ops_check_dead_window): each is declared once, there.
The metric names come from check_xapi's families (what the frontals' textfile holds).
tests/test_prometheus_rules.py fails when the committed file differs from what this writes.

    python tools/prometheus_rules.py          # rewrite prometheus/xapi.rules.yml
    python tools/prometheus_rules.py --check  # exit 1 when the file is stale
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHECK_XAPI = ROOT / "xapi_worker" / "src"  # xapi_worker.check
OPS_DEFAULTS = ROOT / "roles" / "xapi_ops" / "defaults" / "main.yml"
RULES = ROOT / "prometheus" / "xapi.rules.yml"

#: How long a reading stays beyond a threshold before the alert fires: the metrics file is
#: rewritten every 30 s, and a Nagios service alerts after its retries (max_check_attempts).
FOR = "5m"
#: The window over which the LRS's answers are judged (check_xapi probes it once per run).
LRS_WINDOW = "10m"
#: The metrics file older than this: the timer or check_xapi stopped writing it.
STALE_AFTER = 300


def load_check_xapi() -> SimpleNamespace:
    """check_xapi's thresholds and metric families (xapi_worker.check, standard library only:
    imported from the source tree, the worker package need not be installed)."""
    sys.path.insert(0, str(CHECK_XAPI))
    try:
        config = importlib.import_module("xapi_worker.check.config")
        prometheus = importlib.import_module("xapi_worker.check.prometheus")
    finally:
        sys.path.remove(str(CHECK_XAPI))
    return SimpleNamespace(
        DEFAULT_THRESHOLDS=config.DEFAULT_THRESHOLDS,
        GAUGES=prometheus.GAUGES,
        SPOOL_GAUGES=prometheus.SPOOL_GAUGES,
        COUNTER_FIELDS=prometheus.COUNTER_FIELDS,
        RESPONSES=prometheus.RESPONSES,
    )


@dataclass(frozen=True)
class Rule:
    alert: str
    expr: str
    severity: str
    summary: str
    description: str
    for_: str | None = FOR

    def render(self) -> list[str]:
        lines = [f"      - alert: {self.alert}", f"        expr: {_quote(self.expr)}"]
        if self.for_:
            lines.append(f"        for: {self.for_}")
        lines += [
            "        labels:",
            f"          severity: {self.severity}",
            "        annotations:",
            f"          summary: {_quote(self.summary)}",
            f"          description: {_quote(self.description)}",
        ]
        return lines


def _quote(text: str) -> str:
    """A YAML double-quoted scalar."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


#: No series of the textfile anywhere for this long: the metrics are gone, not just stale.
ABSENT_AFTER = "10m"


def rules(check: SimpleNamespace, dead_window: int) -> list[Rule]:
    t = check.DEFAULT_THRESHOLDS
    g = {key: family[0] for key, family in check.GAUGES.items()}
    s = {key: family[0] for key, family in check.SPOOL_GAUGES.items()}
    dead_total = check.COUNTER_FIELDS["dead_lettered"][0]
    responses = check.RESPONSES[0]
    on = "{{ $labels.broker }} ({{ $labels.instance }})"
    node = "node {{ $labels.node }} of " + on
    out: list[Rule] = [
        Rule(
            "XapiBrokerDown",
            f"{g['up']} == 0",
            "critical",
            f"xAPI broker {on} unreachable",
            "check_xapi could not read the broker: its Redis instance is down, or the "
            "monitoring password differs from the broker's (systemctl status "
            "redis-server@xapi on the frontal).",
            "2m",
        ),
        Rule(
            "XapiNoWorkerConsuming",
            f"{g['nodes']} == 0 and {g['queue']} >= {_num(t['queue'][0])}",
            "critical",
            f"statements accumulate on {on}: no worker consumes",
            f"At least {_num(t['queue'][0])} statements queued and no worker node alive: on "
            "the encoding hosts, systemctl status 'celeryd-xapi@*', or run site.yml.",
        ),
    ]
    # Worker nodes alive, a minimum: the role deploys check_xapi with [the site's node count,
    # min(that count, 1)] (roles/xapi_ops/vars/main.yml), so CRITICAL below 1 on any site
    # with a worker; the warning below the site's own count depends on its inventory.
    out.append(
        Rule(
            "XapiWorkerNodesMissing",
            f"{g['nodes']} < 1",
            "critical",
            f"no worker node alive on {on}",
            "Every worker node consuming from this broker is down: systemctl status "
            "'celeryd-xapi@*' and journalctl -u 'celeryd-xapi@*' on the encoding hosts.",
        )
    )
    levels = (("Warning", "warning", 0), ("Critical", "critical", 1))
    high = [
        (
            "XapiQueueLong",
            "queue",
            g["queue"],
            "queue {{ $value }} long on " + on,
            "Statements wait: the workers do not keep up (LRS slow, too few nodes) or are "
            "stopped: playbooks/status.yml.",
        ),
        (
            "XapiOldestStatementTooOld",
            "oldest_age",
            g["oldest_age"],
            "oldest statement queued {{ $value }} s ago on " + on,
            "Statements wait longer than usual: playbooks/status.yml, the workers' journal.",
        ),
        (
            "XapiInFlightHigh",
            "in_flight",
            g["in_flight"],
            "{{ $value }} messages in flight on " + on,
            "The LRS is slow to answer; in-flight messages are delivered or returned, never lost.",
        ),
        (
            "XapiDeadLetters",
            "dead_letters",
            g["dead_letters"],
            "{{ $value }} dead letters on " + on,
            "Statements the LRS refused, or that outlived their maximum age: "
            "playbooks/dead-letters.yml lists them with the LRS's answer (then -e "
            "action=replay or purge).",
        ),
        (
            "XapiDeadLettersRising",
            "dead_new",
            f"increase({dead_total}[{dead_window}s])",
            "{{ $value }} new dead letters on " + on + f" in {dead_window} s",
            "The LRS refuses statements now: playbooks/dead-letters.yml shows its answers.",
        ),
        (
            "XapiNoDeliveryWhileQueued",
            "last_delivery_age",
            f"time() - {g['last_delivery']}",
            "last delivery {{ $value }} s ago with statements queued on " + on,
            "Statements wait and nothing was delivered for a while: a hung worker or LRS (the "
            "worker's journal; the watchdog restarts a hung worker).",
        ),
        (
            "XapiSpoolDeep",
            "spool_depth",
            f"sum without (node) ({s['depth']})",
            "{{ $value }} statements spooled on the nodes of " + on,
            "The LRS has not taken statements for a while: bring it back or fix its "
            "credentials; the spools drain by themselves, oldest first.",
        ),
        (
            "XapiSpoolOld",
            "spool_age",
            s["oldest_age"],
            "oldest statement spooled {{ $value }} s ago on " + node,
            "The LRS has not taken statements for a while (xapi-worker spool list on the "
            "encoding host).",
        ),
        (
            "XapiSpoolFilling",
            "spool_used",
            f"100 * {s['size']} / ({s['max_bytes']} > 0)",
            "spool {{ $value }} % used on " + node,
            "The node keeps what the LRS does not take on its disk; once full it stops taking "
            "from the broker: bring the LRS back.",
        ),
    ]
    for alert, name, value, summary, description in high:
        for suffix, severity, i in levels:
            bound = _num(t[name][i])
            expr = f"{value} >= {bound}"
            if name == "last_delivery_age":  # an idle site delivers nothing: no alert
                expr += f" and {g['queue']} > 0"
            if name == "dead_new":  # the counter keeps its increase after a purge or replay
                expr += f" and {g['dead_letters']} > 0"
            for_ = None if name == "dead_new" else FOR  # already a window
            out.append(
                Rule(
                    f"{alert}{suffix}",
                    expr,
                    severity,
                    f"{summary} (>= {bound})",
                    description,
                    for_,
                )
            )
    out += [
        Rule(
            "XapiSpoolFull",
            f"{s['full']} == 1",
            "critical",
            "spool full on " + node + ": the node no longer takes from the broker",
            "Statements accumulate in Redis, up to xapi_broker_maxmemory, then Pod's .delay() "
            "fails: bring the LRS back, urgently.",
            None,
        ),
        Rule(
            "XapiSpoolDamaged",
            f"{s['damaged']} > 0",
            "warning",
            "damaged spool set aside on " + node,
            "The worker's log says why; the file <node>.sqlite3.damaged-<time> stays in the "
            "spool directory for you to inspect.",
            None,
        ),
        Rule(
            "XapiLrsCredentialsRefused",
            f'increase({responses}{{status=~"401|403"}}[{LRS_WINDOW}]) > 0',
            "critical",
            f"the LRS refuses the workers' credentials (HTTP {{{{ $labels.status }}}}) on {on}",
            "Put the LRS's password in xapi_lrs_password (vault) and run site.yml; the "
            "workers retry meanwhile.",
            None,
        ),
        Rule(
            "XapiLrsFailing",
            f'sum without (status) (increase({responses}{{status!~"2.."}}[{LRS_WINDOW}])) > 0'
            f' unless sum without (status) (increase({responses}{{status=~"2.."}}'
            f"[{LRS_WINDOW}])) > 0",
            "critical",
            f"the LRS accepted no batch in {LRS_WINDOW} on {on}",
            "Every POST to the LRS failed (unreachable, TLS, HTTP errors): statements wait in "
            "the queue or the spools, nothing is lost; fix the LRS.",
            None,
        ),
        Rule(
            "XapiMetricsAbsent",
            f"absent_over_time({g['up']}[{ABSENT_AFTER}])",
            "critical",
            f"no xAPI metrics from any frontal for {ABSENT_AFTER}",
            "No frontal's xapi.prom is scraped: node_exporter down or its textfile collector "
            "off, the file removed, or xapi-metrics.timer never ran (systemctl status "
            "xapi-metrics.timer prometheus-node-exporter on the frontals).",
            None,
        ),
        Rule(
            "XapiMetricsUnreadable",
            "node_textfile_scrape_error > 0",
            "warning",
            "node_exporter cannot read a textfile of {{ $labels.instance }}",
            "node_exporter drops every series of a textfile it cannot parse, xapi.prom's "
            "included: journalctl -u prometheus-node-exporter on that host.",
            "5m",
        ),
        Rule(
            "XapiMetricsStale",
            f'time() - node_textfile_mtime_seconds{{file=~"(.*/)?xapi[.]prom"}} > {STALE_AFTER}',
            "warning",
            "the xAPI metrics of {{ $labels.instance }} are {{ $value }} s old",
            "xapi-metrics.timer on the frontal no longer rewrites the file: systemctl status "
            "xapi-metrics.timer xapi-metrics.service.",
            None,
        ),
    ]
    return out


def render() -> str:
    check = load_check_xapi()
    defaults = yaml.safe_load(OPS_DEFAULTS.read_text())
    dead_window = int(defaults["xapi_ops_check_dead_window"])
    lines = [
        "---",
        "# yamllint disable rule:line-length",
        "# Prometheus alert rules of the xAPI pipeline, for the metrics the frontals write for",
        "# node_exporter's textfile collector (roles/xapi_ops). GENERATED by",
        "# tools/prometheus_rules.py from check_xapi's default thresholds: edit them there and",
        "# run it again (tests/test_prometheus_rules.py fails on a stale file). Load it with",
        "# `rule_files:` in prometheus.yml (operator guide, Monitoring > Prometheus).",
        "groups:",
        "  - name: xapi",
        "    rules:",
    ]
    for rule in rules(check, dead_window):
        lines += rule.render()
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not RULES.exists() or RULES.read_text() != text:
            print(f"{RULES.relative_to(ROOT)} is stale: run python tools/prometheus_rules.py")
            return 1
        return 0
    RULES.parent.mkdir(exist_ok=True)
    RULES.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
