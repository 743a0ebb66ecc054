"""The retention rule, for what the worker sets aside as well as for its dead letters.

Statements carry learners' identities; nothing the worker keeps of them may stay for ever.
The rule is the dead letters' (``XAPI_WORKER_DEAD_LETTER_RETENTION_DAYS``, 30 by default;
0 keeps everything until removed by hand), applied hourly by each node's drainer
(drain.py) to:

- the dead letters: the node's, on its disk (``DiskDeadLetters.purge_older``, deadstore.py:
  a chunk at a time through the index of their time), and the broker's list
  (``RedisAccess.purge_older``: a node without a spool, or of an older release, writes
  there). A node whose dead letters reach ``XAPI_WORKER_DEAD_LETTER_MAX_MB`` deletes its
  expired ones at once, before it refuses any;
- the damaged spool files set aside (``<node>.sqlite3.damaged-<time>``, with their
  ``-wal`` and ``-shm``): deleted once set aside longer than that, by the time in their
  name; until then ``status`` counts them and ``check_xapi`` warns;
- ``xapi.unreadable`` (what came on the queue and is no message): an element carries no
  time, so the first hourly pass that meets one wraps it, in place of the bare element, as
  ``{"xapi_unreadable_since": <ISO time>, "raw": <text>}`` (``raw_base64`` instead for bytes
  that are no UTF-8); a wrapped element older than the rule is removed. ``status`` gives
  the oldest one's age.

Not expired, on purpose: statements held because the LRS refuses the worker's credentials
or its requests (401/403, a configuration error). They are no statement's fault, and
dropping them would lose data for a mistake of the set-up; the operator is told instead,
with their age: ``status`` (``spool_oldest_age_s``; without the spool, ``queue``),
``check_xapi`` (``spool_age``, critical after a day by default; ``oldest_age``; ``lrs``,
critical on 401/403).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import redis

from .delivery import iso, parse_iso

log = logging.getLogger("xapi_worker.retention")

#: The field of a wrapped element of ``xapi.unreadable``: when the worker first met it.
UNREADABLE_SINCE = "xapi_unreadable_since"
#: The time in a damaged spool file's name (spool.py's ``_set_aside``).
#: A salvaged one (``<name>.salvaged``, salvage.py) expires by the same time: it holds every
#: statement the file held.
DAMAGED_STAMP = re.compile(r"\.damaged-(\d{8}T\d{6}Z)(?:\.salvaged)?(?:-wal|-shm)?$")
#: Elements of ``xapi.unreadable`` read per LRANGE.
CHUNK = 500

# KEYS[1] the list; ARGV[1] an element, ARGV[2] its wrapped form. Replaces one copy of the
# element by its wrapped form (at the end), only if it is still there; at maxmemory too (a
# few bytes more: scripts.py).
_WRAP = """#!lua flags=allow-oom
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[2])
return 1
"""


def damaged_since(path: Path) -> float | None:
    """When a damaged spool file was set aside (epoch seconds), from its name."""
    found = DAMAGED_STAMP.search(path.name)
    if found is None:
        return None
    return float(calendar.timegm(time.strptime(found.group(1), "%Y%m%dT%H%M%SZ")))


def expire_damaged(
    directory: Path, days: float, name: str = "*.sqlite3", now: float | None = None
) -> list[Path]:
    """Delete the damaged spool files of ``name`` (a node's spool file; all by default), and
    their -wal, -shm, set aside more than ``days`` ago; returns what was deleted. ``days``
    0: none."""
    if not days or not directory.is_dir():
        return []
    limit = (time.time() if now is None else now) - days * 86400
    deleted: list[Path] = []
    for path in sorted(directory.glob(f"{name}.damaged-*")):
        since = damaged_since(path)
        if since is None or since >= limit or not path.is_file() or path.is_symlink():
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("damaged spool file %s not deleted: %s", path, exc)
            continue
        deleted.append(path)
    return deleted


def wrap(raw: bytes, now: float) -> str:
    entry: dict[str, Any] = {UNREADABLE_SINCE: iso(now)}
    try:
        entry["raw"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        entry["raw_base64"] = base64.b64encode(raw).decode()
    return json.dumps(entry, sort_keys=True)


def unwrap(element: bytes) -> tuple[bytes, float | None]:
    """An element of ``xapi.unreadable`` as it came (its bytes), and since when it is kept
    (None: not wrapped yet)."""
    try:
        value = json.loads(element)
    except (ValueError, RecursionError):
        return element, None
    if not isinstance(value, dict) or UNREADABLE_SINCE not in value:
        return element, None
    since = parse_iso(value.get(UNREADABLE_SINCE))
    if isinstance(value.get("raw"), str):
        return value["raw"].encode("utf-8", "surrogatepass"), since
    with contextlib.suppress(binascii.Error, ValueError, TypeError):
        return base64.b64decode(value.get("raw_base64", ""), validate=True), since
    return element, since


def expire_unreadable(
    client: redis.Redis, key: str, days: float, now: float | None = None
) -> tuple[int, int]:
    """Wrap the bare elements of ``key`` with the time of now, remove the wrapped ones older
    than ``days``; returns (wrapped, removed). ``days`` 0: wrap only (their age is told)."""
    now = time.time() if now is None else now
    limit = now - days * 86400 if days else None
    script = client.register_script(_WRAP)
    wrapped = removed = 0
    start = 0
    while True:
        chunk: list[bytes] = client.lrange(key, start, start + CHUNK - 1)  # type: ignore[assignment]
        if not chunk:
            break
        moved = 0
        for element in chunk:
            _, since = unwrap(element)
            if since is None:
                if script(keys=[key], args=[element, wrap(element, now)], client=client):
                    wrapped += 1
                    moved += 1
            elif limit is not None and since < limit:
                gone = int(client.lrem(key, 1, element))  # type: ignore[arg-type]
                removed += gone
                moved += gone
        # What was removed (or moved to the end) shifted the rest left.
        start += len(chunk) - moved
    return wrapped, removed


def unreadable_oldest(client: redis.Redis, key: str) -> float | None:
    """The time the oldest wrapped element of ``key`` is kept since (the first CHUNK read:
    wrapping appends, so the oldest are first), None when none is wrapped."""
    chunk: list[bytes] = client.lrange(key, 0, CHUNK - 1)  # type: ignore[assignment]
    times = [since for since in (unwrap(e)[1] for e in chunk) if since is not None]
    return min(times) if times else None


class Retention:
    """The hourly pass of one node's drainer (besides the dead letters)."""

    def __init__(self, client: redis.Redis, unreadable: str, spool_file: Path | None) -> None:
        self.client = client
        self.unreadable = unreadable
        self.spool_file = spool_file  # the node's spool: its damaged files set aside

    def run(self, days: float) -> None:
        if self.spool_file is not None:
            found = expire_damaged(self.spool_file.parent, days, self.spool_file.name)
            for path in found:
                log.warning(
                    "damaged spool file %s deleted: set aside more than %g days ago "
                    "(XAPI_WORKER_DEAD_LETTER_RETENTION_DAYS)",
                    path,
                    days,
                )
        wrapped, removed = expire_unreadable(self.client, self.unreadable, days)
        if removed:
            log.warning(
                "%d element(s) of %s removed: kept more than %g days (retention)",
                removed,
                self.unreadable,
                days,
            )
        if wrapped:
            log.info("%d element(s) of %s dated for the retention rule", wrapped, self.unreadable)
