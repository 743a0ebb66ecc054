"""Structured event logs: logger ``xapi_worker.events``, one JSON object per log message.

Emitted next to the worker's human-readable lines (which stay), for a machine to read from
the systemd journal's MESSAGE or a log file. Events: ``delivered``, ``retry``,
``dead_letter``, ``spooled``, ``spool_full``, ``dead_letters_full``. Only counts, statuses,
delays, ids and short reasons go in: never a statement body, an actor (learners' identities
are personal data), a URL with credentials or a password.
"""

from __future__ import annotations

import json
import logging

from .content import json_text

log = logging.getLogger("xapi_worker.events")

Value = str | int | float | bool | None


def emit(event: str, level: int = logging.INFO, **fields: Value) -> None:
    """Log ``{"event": event, **fields}`` as one JSON line. Never raises."""
    try:
        line = json_text({"event": event, **fields}, sort_keys=True, compact=False)
    except (TypeError, ValueError):  # a field of ours not JSON-able: a bug, not a failure
        line = json.dumps({"event": event, "unloggable": True}, sort_keys=True)
    log.log(level, "%s", line)
