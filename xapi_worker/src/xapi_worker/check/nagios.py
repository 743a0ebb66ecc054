"""check_xapi's verdict in the Nagios plugin convention: the readings against the thresholds,
one status line with performance data, the exit code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

from .broker import BrokerState, NodeSpool, broker_failure, read_broker
from .config import AGE_METRICS, MIN_METRICS, PERCENT_METRICS, Broker, Config, ConfigError
from .lrs import LRSState, probe_lrs
from .states import CRITICAL, OK, STATE_NAMES, UNKNOWN, WARNING

#: A spool hash older than this while the node's heartbeat lives: the worker (rewriting it
#: every 5 s) no longer reports, so its readings can no longer be trusted.
SPOOL_STALE = 60.0


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{round(seconds)} s"


def set_aside_text(spool: NodeSpool) -> str:
    """The WARNING about a node's spool files set aside as damaged: how many, since when,
    which (their readable statements wait for `xapi-worker spool drain` on its host)."""
    names = list(spool.damaged_files[:3])
    if len(spool.damaged_files) > 3:
        names.append(f"and {len(spool.damaged_files) - 3} more")
    since = "" if spool.damaged_age is None else f", the oldest {_duration(spool.damaged_age)} ago"
    which = f" ({', '.join(names)})" if names else ""
    return (
        f"{spool.damaged} damaged spool files set aside on node {spool.node}{since}{which}: "
        "their statements wait; run `xapi-worker spool drain` on its host"
    )


@dataclass
class Report:
    problems: list[tuple[int, str]] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    perfdata: list[str] = field(default_factory=list)
    full: bool = True  # every metric checked (not --metric): the summary follows the problems

    def add(self, state: int, text: str, first: bool = False) -> None:
        """A problem; `first`: before the others of its severity (a diagnosis that explains
        them, which a dashboard showing the line's start should show)."""
        if first:
            self.problems.insert(0, (state, text))
        else:
            self.problems.append((state, text))

    @property
    def state(self) -> int:
        return max((s for s, _ in self.problems), key=_severity, default=OK)

    def line(self, secrets: Sequence[str]) -> str:
        ordered = sorted(self.problems, key=lambda p: -_severity(p[0]))
        parts = [text for _, text in ordered]
        if self.summary and (self.full or not parts):
            parts.append(", ".join(self.summary))
        text = "; ".join(parts) or "nothing checked"
        out = f"XAPI {STATE_NAMES[self.state]} - {text}"
        if self.perfdata:
            out += " | " + " ".join(self.perfdata)
        return mask(out, secrets)


def _severity(state: int) -> int:
    """CRITICAL before UNKNOWN before WARNING before OK, in the status and its line."""
    return {CRITICAL: 3, UNKNOWN: 2, WARNING: 1, OK: 0}[state]


def mask(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each secret hidden, as it is and percent-encoded (the last guard: no
    message above is built from a password)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) < 3:  # hiding one or two characters would garble the line
            continue
        for form in {secret, quote(secret, safe=""), quote_plus(secret, safe="")}:
            text = text.replace(form, "****")
    return text


def _num(value: float) -> str:
    """An integer as such, anything else with one decimal."""
    value = round(float(value), 1)
    return str(int(value)) if value.is_integer() else f"{value:.1f}"


def perf(
    label: str,
    value: float,
    uom: str,
    warn: float | None,
    crit: float | None,
    digits: int = 1,
) -> str:
    """``'label'=value[UOM];warn;crit;0;`` (the thresholds as configured)."""
    w = "" if warn is None else _num(warn)
    c = "" if crit is None else _num(crit)
    shown = _num(value) if digits == 1 else f"{value:.{digits}f}"
    return f"'{label}'={shown}{uom};{w};{c};0;"


def level(name: str, value: float, thresholds: dict[str, tuple[float, float]]) -> int:
    warn, crit = thresholds[name]
    if name in MIN_METRICS:
        return CRITICAL if value < crit else WARNING if value < warn else OK
    return CRITICAL if value >= crit else WARNING if value >= warn else OK


PROBLEM_TEXTS: dict[str, Callable[[float, float, BrokerState], str]] = {
    "queue": lambda v, t, _s: f"queue {_num(v)} (>= {_num(t)})",
    "oldest_age": lambda v, t, _s: f"oldest statement queued {round(v)} s ago (>= {_num(t)} s)",
    "in_flight": lambda v, t, _s: f"{_num(v)} in flight (>= {_num(t)})",
    "dead_letters": lambda v, t, _s: f"{_num(v)} dead letters (>= {_num(t)})",
    "dead_new": lambda v, t, _s: f"{_num(v)} new dead letters (>= {_num(t)})",
    "last_delivery_age": lambda v, t, s: (
        f"last delivery {round(v)} s ago with {s.queue} queued (>= {_num(t)} s)"
    ),
    "nodes": lambda v, t, _s: f"{_num(v)} worker nodes alive (< {_num(t)})",
    "spool_depth": lambda v, t, _s: f"{_num(v)} statements spooled (>= {_num(t)})",
    "spool_age": lambda v, t, _s: f"oldest statement spooled {round(v)} s ago (>= {_num(t)} s)",
    "spool_used": lambda v, t, s: (
        f"spool filling: spool of node {s.fullest().node} {_num(v)} % used (>= {_num(t)} %)"
    ),
}


def evaluate_broker(
    report: Report,
    broker: Broker,
    state: BrokerState,
    config: Config,
    only: str | None,
    lrs: LRSState | None,
    several: bool,
) -> None:
    prefix = f"{broker.name}: " if several else ""
    label = f"{broker.name}_" if several else ""
    thresholds = config.thresholds
    values: dict[str, float | None] = {
        "queue": state.queue,
        "oldest_age": state.oldest_age,
        "in_flight": state.in_flight,
        "nodes": state.nodes,
        "dead_letters": state.dead_letters,
        "dead_new": state.dead_new,
        "last_delivery_age": state.last_delivery_age,
        # None without any spool hash: no perfdata, no alert (the spool is off)
        "spool_depth": state.spool_depth,
        "spool_age": state.spool_age,
        "spool_used": state.spool_used,
    }
    for name, value in values.items():
        if only is not None and name != only:
            continue
        if value is None:
            continue  # no timestamp, nothing delivered yet: left out
        warn, crit = thresholds[name]
        uom = "s" if name in AGE_METRICS else "%" if name in PERCENT_METRICS else ""
        report.perfdata.append(perf(label + name, value, uom, warn, crit))
        if name == "last_delivery_age" and state.queue == 0:
            continue  # an idle site delivers nothing: reported, not alerted on
        result = level(name, value, thresholds)
        if result != OK:
            bound = crit if result == CRITICAL else warn
            report.add(result, prefix + PROBLEM_TEXTS[name](value, bound, state))
    if only in (None, "nodes") and state.nodes < config.nodes_expected:
        if level("nodes", state.nodes, thresholds) == OK:
            report.add(
                WARNING,
                f"{prefix}{state.nodes} of {config.nodes_expected} expected worker nodes alive",
            )
    if only in (None, "spool_used"):
        for spool in state.spools:
            if spool.full:  # whatever the thresholds: the node has stopped consuming
                report.add(
                    CRITICAL,
                    f"{prefix}spool of node {spool.node} full: the node no longer takes from "
                    "the broker; statements accumulate in Redis",
                    first=True,
                )
    if only is None:
        for spool in state.spools:
            if spool.alive and (spool.updated_age is None or spool.updated_age > SPOOL_STALE):
                since = (
                    "never" if spool.updated_age is None else f"{round(spool.updated_age)} s ago"
                )
                report.add(
                    WARNING,
                    f"{prefix}spool state of node {spool.node} stale (updated {since} while "
                    "its heartbeat is alive)",
                )
            if spool.damaged > 0:
                report.add(WARNING, prefix + set_aside_text(spool))
    if (
        only is None
        and lrs is not None
        and lrs.state == OK
        and state.nodes == 0
        and state.queue >= thresholds["queue"][0]
    ):
        report.add(
            CRITICAL,
            f"{prefix}statements accumulate while the LRS answers: no worker consumes "
            f"(queue {state.queue}, 0 worker nodes alive)",
            first=True,
        )
    if only is None:
        bits = [f"queue {state.queue}"]
        if state.oldest_age is not None:
            bits.append(f"oldest {_num(round(state.oldest_age))} s")
        bits.append(f"{state.in_flight} in flight")
        bits.append(f"{state.nodes}/{config.nodes_expected} nodes")
        bits.append(f"{state.dead_letters} dead letters ({state.dead_new} new)")
        if state.last_delivery_age is not None:
            bits.append(f"last delivery {_num(round(state.last_delivery_age))} s ago")
        else:
            bits.append("no delivery recorded")
        if state.spools:
            spooled = f"{state.spool_depth} spooled"
            if state.spool_depth:
                spooled += f" (oldest {_num(round(state.spool_age or 0))} s)"
            bits.append(f"{spooled}, spool {_num(state.spool_used or 0)} % used")
        report.summary.append(prefix + ", ".join(bits))
    elif only != "lrs":
        value = values[only]
        shown = "not available" if value is None else _num(round(value, 1))
        report.summary.append(f"{prefix}{only} {shown}")


def run(config: Config, only: str | None) -> Report:
    report = Report(full=only is None)
    lrs_state: LRSState | None = None
    if config.lrs is not None and only in (None, "lrs"):
        lrs_state = probe_lrs(config.lrs, config.timeout)
        if lrs_state.state != OK:
            report.add(lrs_state.state, lrs_state.text)
        if lrs_state.seconds is not None:
            report.perfdata.append(perf("lrs_time", lrs_state.seconds, "s", None, None, 3))
    elif only == "lrs":
        raise ConfigError("--metric lrs: the configuration has no lrs")
    if only != "lrs":
        several = len(config.brokers) > 1
        for broker in config.brokers:
            try:
                state = read_broker(broker, config.timeout, config.dead_window)
            except Exception as exc:
                report.add(*broker_failure(broker, exc))
                continue
            evaluate_broker(report, broker, state, config, only, lrs_state, several)
    if lrs_state is not None and lrs_state.state == OK:
        report.summary.append(lrs_state.text)
    return report
