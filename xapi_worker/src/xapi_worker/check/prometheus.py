"""check_xapi --prometheus: the same readings plus the workers' counters (the hash
``xapi.metrics`` they keep in the broker) in Prometheus' text format, written whole for
node_exporter's textfile collector (roles/xapi_ops README, "Metrics")."""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time

from .. import names
from ..resp import pairs
from .broker import connect, read_broker
from .config import Config
from .nagios import _num

# The workers' counters live in the broker (xapi_worker/README.md, "Metrics"): one hash per
# broker, whatever the hosts, nodes and pool processes that delivered. Counter fields and the
# families they become; histogram fields are `<name>_bucket:<le>`, `<name>_sum`, `<name>_count`.
COUNTER_FIELDS = {
    names.DELIVERED: ("xapi_statements_delivered_total", "Statements the LRS accepted (verified)."),
    names.RETRIED: ("xapi_statements_retried_total", "Statements scheduled for a retry."),
    names.DEAD_LETTERED: ("xapi_statements_dead_lettered_total", "Statements dead-lettered."),
    names.SPOOLED: (
        "xapi_statements_spooled_total",
        "Statements moved from the broker into a node's on-disk spool.",
    ),
}
RESPONSES = ("xapi_lrs_responses_total", "LRS answers by HTTP status (error: none).")
HISTOGRAMS = {
    names.BATCH_SIZE: ("xapi_batch_size", "Statements per POST to the LRS."),
    names.LRS_LATENCY: ("xapi_lrs_latency_seconds", "Duration of each POST to the LRS."),
}
GAUGES = {
    "up": ("xapi_broker_up", "1 when the broker answered this collection."),
    "queue": ("xapi_queue_length", "Statements waiting in queue xapi."),
    "oldest_age": ("xapi_oldest_queued_age_seconds", "Age of the oldest queued statement."),
    "in_flight": ("xapi_in_flight", "Messages the workers hold (unacked and in-flight lists)."),
    "nodes": ("xapi_worker_nodes_alive", "Worker nodes whose heartbeat is alive."),
    "dead_letters": ("xapi_dead_letters", "Statements in the dead letters."),
    "last_delivery": ("xapi_last_delivery_timestamp_seconds", "When a batch was last accepted."),
}
#: Per node with a spool (label node): the attribute of NodeSpool and its family.
SPOOL_GAUGES = {
    "depth": ("xapi_spool_depth", "Statements in the node's on-disk spool."),
    "oldest_age": ("xapi_spool_oldest_age_seconds", "Age of the oldest spooled statement."),
    "size": ("xapi_spool_bytes", "Bytes the node's spool uses."),
    "max_bytes": ("xapi_spool_max_bytes", "Limit of the node's spool in bytes."),
    "full": ("xapi_spool_full", "1 when the spool is full: the node stops taking from Redis."),
    "damaged": ("xapi_spool_damaged", "Damaged spool files set aside on the node."),
}


#: A histogram bound as the worker writes it (``f"{bound:g}"``, or ``+Inf``), whole: the text
#: becomes a label, and float() would also take spaces and line breaks around a number (a line
#: break in a label makes node_exporter drop the whole file).
LE_TEXT = re.compile(r"\+Inf|[0-9]+(?:\.[0-9]+)?(?:e[-+][0-9]+)?")
#: An LRS answer's status as the worker counts it: three ASCII digits, or ``error``.
STATUS_TEXT = re.compile(r"[0-9]{3}|error")


def _le(text: str) -> tuple[float, str] | None:
    """A histogram bound as written by the worker: (its value, its label), or None."""
    if LE_TEXT.fullmatch(text) is None:
        return None
    value = float(text)
    # 1e+400 reads as inf, which node_exporter's parser refuses (and then drops the file).
    if text != "+Inf" and not math.isfinite(value):
        return None
    return (value, text) if value >= 0 else None


def _value(raw: bytes) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def prometheus_text(config: Config) -> str:
    """Every broker's gauges and counters in Prometheus' text format (0.0.4)."""
    families: dict[str, tuple[str, str, list[str]]] = {}

    def sample(family: tuple[str, str], kind: str, name: str, labels: str, value: float) -> None:
        families.setdefault(family[0], (family[1], kind, []))[2].append(
            f"{name}{{{labels}}} {_num(value) if math.isfinite(value) else value}"
        )

    for broker in config.brokers:
        # Broker names are [A-Za-z0-9_.-] (parse_config): nothing to escape in a label.
        label = f'broker="{broker.name}"'
        try:
            state = read_broker(broker, config.timeout, config.dead_window)
            with connect(broker, config.timeout) as client:
                flat = client.bulks("HGETALL", names.METRICS)
        except Exception:  # reported by the up gauge; the check's line says why
            sample(GAUGES["up"], "gauge", GAUGES["up"][0], label, 0)
            continue
        sample(GAUGES["up"], "gauge", GAUGES["up"][0], label, 1)
        for key in ("queue", "in_flight", "nodes", "dead_letters"):
            sample(GAUGES[key], "gauge", GAUGES[key][0], label, getattr(state, key))
        if state.oldest_age is not None:
            sample(GAUGES["oldest_age"], "gauge", GAUGES["oldest_age"][0], label, state.oldest_age)
        if state.last_delivery_age is not None:
            stamp = round(time.time() - state.last_delivery_age, 3)
            sample(GAUGES["last_delivery"], "gauge", GAUGES["last_delivery"][0], label, stamp)
        for spool in state.spools:
            # Node names come from the registry: escaped as the text format asks.
            node = spool.node.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            labels = f'{label},node="{node}"'
            for attr, family in SPOOL_GAUGES.items():
                value = getattr(spool, attr)
                if attr == "oldest_age" and value is None:
                    value = 0.0  # an empty spool: nothing waits
                sample(family, "gauge", family[0], labels, float(value))
        fields = pairs(flat)
        for field_name, family in COUNTER_FIELDS.items():
            number = _value(fields.get(field_name, b"0"))
            sample(family, "counter", family[0], label, number or 0)
        for field_name, raw in sorted(fields.items()):
            status = field_name.removeprefix(names.RESPONSES_PREFIX)
            if status != field_name and STATUS_TEXT.fullmatch(status):
                number = _value(raw)
                if number is not None:
                    labels = f'{label},status="{status}"'
                    sample(RESPONSES, "counter", RESPONSES[0], labels, number)
        for prefix, family in HISTOGRAMS.items():
            buckets = []
            for field_name, raw in fields.items():
                bound = _le(field_name.removeprefix(prefix + names.BUCKET))
                if field_name.startswith(prefix + names.BUCKET) and bound is not None:
                    number = _value(raw)
                    if number is not None:
                        buckets.append((bound[0], bound[1], number))
            if not buckets:
                continue
            for _, text, number in sorted(buckets):
                labels = f'{label},le="{text}"'
                sample(family, "histogram", family[0] + "_bucket", labels, number)
            for suffix in (names.SUM, names.COUNT):
                number = _value(fields.get(prefix + suffix, b"0")) or 0
                sample(family, "histogram", family[0] + suffix, label, number)
    out = []
    for name, (text, kind, samples) in families.items():
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(out) + "\n"


def write_textfile(path: str, text: str) -> None:
    """Replaces ``path`` whole (a temporary file in its directory, then a rename), so that
    node_exporter never reads half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".check_xapi.", dir=directory)
    try:
        with os.fdopen(fd, "w") as out:
            # On the descriptor, not the name: the directory may be another user's.
            os.fchmod(out.fileno(), 0o644)
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
