"""What a broker holds, as check_xapi reads it: the queue and its oldest statement, what the
workers hold in flight, their heartbeats and spools, the dead letters, the last delivery."""

from __future__ import annotations

import base64
import json
import math
import re
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .. import names
from ..resp import Connection, ProtocolError, ReplyError, pairs
from .config import Broker
from .states import CRITICAL, UNKNOWN

#: Dead letters read at most to count the new ones (newest first), and per LRANGE.
DEAD_READ_CAP = 10_000
DEAD_READ_CHUNK = 500
#: Every key check_xapi reads (a node named ``node``; the monitoring user's ACL covers them).
KEYS_READ = (
    names.QUEUE,
    names.registry_key(),
    names.inflight_key(names.QUEUE, "node"),
    names.alive_key(names.inflight_key(names.QUEUE, "node")),
    names.spool_state_key(names.QUEUE, "node"),
    names.UNACKED,
    names.DEAD_LETTERS,
    names.LAST_DELIVERY,
    names.METRICS,
)


def connect(broker: Broker, timeout: float) -> Connection:
    """A connection to ``broker``, authenticated, its database selected."""
    client = Connection(broker.host, broker.port, timeout, broker.tls, broker.ca)
    try:
        client.login(broker.user, broker.password, broker.db)
    except BaseException:
        client.close()
        raise
    return client


def parse_time(value: object) -> float | None:
    """Epoch seconds of an ISO 8601 timestamp (UTC when it names no zone), else None."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # noqa: UP017 (the worker's own spelling)
    return when.timestamp()


def statement_time(raw: bytes) -> float | None:
    """The statement ``timestamp`` of a queued message: kombu's JSON envelope whose body
    (base64) is Celery protocol 2's ``[args, kwargs, embed]``, args[0] the statement."""
    try:
        envelope = json.loads(raw)
        body: Any = envelope["body"]
        encoding = (envelope.get("properties") or {}).get("body_encoding")
        if encoding == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        statement = args[0]
    # RecursionError: a message nested deeper than the parser's stack (anyone may queue one):
    # its time is unknown, and the check goes on with the rest.
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None
    if not isinstance(statement, dict):
        return None
    return parse_time(statement.get("timestamp"))


@dataclass
class NodeSpool:
    """A node's spool hash (``<in-flight list>.spool``) as read, with the node's heartbeat."""

    node: str
    depth: int
    oldest_age: float | None  # None: the spool is empty
    size: int
    max_bytes: int
    full: bool
    damaged: int
    updated_age: float | None  # None: no readable ``updated``
    alive: bool
    damaged_files: tuple[str, ...] = ()  # set aside, not drained yet
    damaged_age: float | None = None  # since the oldest of them was set aside
    # The node's dead letters, kept on its disk (xapi_worker's deadstore.py): how many, how
    # many written in the last 24 h, the oldest one's age.
    dead_letters: int = 0
    dead_new: int = 0
    dead_oldest_age: float | None = None

    @property
    def used(self) -> float:
        """Percent of max_bytes in use (0 without a limit to compare with)."""
        return 100.0 * self.size / self.max_bytes if self.max_bytes > 0 else 0.0


def _field_int(fields: dict[str, bytes], name: str) -> int:
    try:
        return max(0, int(fields.get(name, b"0") or b"0"))
    except ValueError:
        return 0


def _field_float(fields: dict[str, bytes], name: str) -> float | None:
    try:
        value = float(fields.get(name, b"") or b"nan")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_spool(client: Connection, member: str, alive: bool, now: float) -> NodeSpool | None:
    """The spool of the node whose in-flight list is ``member``; None without its hash (a
    node with the spool off, or a worker older than the spool)."""
    flat = client.bulks("HGETALL", member + names.SPOOL)
    if not flat:
        return None
    fields = pairs(flat)
    oldest = _field_float(fields, "oldest")
    updated = _field_float(fields, "updated")
    damaged_since = _field_float(fields, "damaged_since")
    dead_oldest = _field_float(fields, "dead_oldest")
    return NodeSpool(
        node=names.node_of(member),
        depth=_field_int(fields, "depth"),
        oldest_age=None if oldest is None else max(0.0, now - oldest),
        size=_field_int(fields, "bytes"),
        max_bytes=_field_int(fields, "max_bytes"),
        full=fields.get("full", b"0").strip() == b"1",
        damaged=_field_int(fields, "damaged"),
        updated_age=None if updated is None else max(0.0, now - updated),
        alive=alive,
        damaged_files=tuple(map(_plain, _field_text(fields, "damaged_files").split())),
        damaged_age=None if damaged_since is None else max(0.0, now - damaged_since),
        dead_letters=_field_int(fields, "dead_letters"),
        dead_new=_field_int(fields, "dead_new"),
        dead_oldest_age=None if dead_oldest is None else max(0.0, now - dead_oldest),
    )


def _field_text(fields: dict[str, bytes], name: str) -> str:
    return fields.get(name, b"").decode("ascii", "replace")


def _plain(name: str) -> str:
    """A file name as the worker writes it (spool.node_file), anything else replaced: the
    plugin's output line stays one line of plain text whatever the hash holds."""
    return re.sub(r"[^A-Za-z0-9@._-]", "_", name)[:200]


@dataclass
class BrokerState:
    queue: int
    oldest_age: float | None
    in_flight: int
    nodes: int
    dead_letters: int
    dead_new: int
    last_delivery_age: float | None
    spools: list[NodeSpool] = field(default_factory=list)

    @property
    def spool_depth(self) -> int | None:
        return sum(s.depth for s in self.spools) if self.spools else None

    @property
    def spool_age(self) -> float | None:
        if not self.spools:
            return None
        return max((s.oldest_age for s in self.spools if s.oldest_age is not None), default=0.0)

    @property
    def spool_used(self) -> float | None:
        return max(s.used for s in self.spools) if self.spools else None

    def fullest(self) -> NodeSpool:
        return max(self.spools, key=lambda s: s.used)


def count_new_dead(client: Connection, key: str, total: int, since: float) -> int:
    """Dead letters whose ``time`` is at or after ``since``: read newest first (the worker
    appends on the right), stop at the first older one, at most DEAD_READ_CAP entries."""
    new = 0
    read = 0
    end = -1
    while read < min(total, DEAD_READ_CAP):
        size = min(DEAD_READ_CHUNK, DEAD_READ_CAP - read)
        chunk = client.bulks("LRANGE", key, str(end - size + 1), str(end))
        if not chunk:
            break
        for raw in reversed(chunk):
            try:
                entry = json.loads(raw)
            except (ValueError, RecursionError):  # a statement nested past the parser's stack
                continue
            when = parse_time(entry.get("time")) if isinstance(entry, dict) else None
            if when is None:
                continue
            if when < since:
                return new
            new += 1
        read += len(chunk)
        end -= len(chunk)
    return new


def read_broker(broker: Broker, timeout: float, dead_window: float) -> BrokerState:
    with connect(broker, timeout) as client:
        now = time.time()
        queue = client.integer("LLEN", names.QUEUE)
        oldest_age = None
        if queue:
            raw = client.bulk("LINDEX", names.QUEUE, "-1")
            when = statement_time(raw) if raw is not None else None
            if when is not None:
                oldest_age = max(0.0, now - when)
        members = sorted(
            m.decode("utf-8", "replace") for m in client.bulks("SMEMBERS", names.registry_key())
        )
        in_flight = client.integer("HLEN", names.UNACKED)
        nodes = 0
        spools = []
        for member in members:
            in_flight += client.integer("LLEN", member)
            alive = bool(client.integer("EXISTS", names.alive_key(member)))
            # a `dead-letters replay` run registers as a node while it runs: not one
            nodes += 1 if alive and not names.is_replay(member) else 0
            spool = read_spool(client, member, alive, now)
            if spool is not None:
                spools.append(spool)
        # The broker's list (nodes without a spool, or of an older release), and the dead
        # letters each node with a spool keeps on its disk, as it reports them.
        legacy = client.integer("LLEN", broker.dead_letter_key)
        dead_new = count_new_dead(client, broker.dead_letter_key, legacy, now - dead_window)
        dead = legacy + sum(s.dead_letters for s in spools)
        dead_new += sum(s.dead_new for s in spools)
        last = client.bulk("GET", names.LAST_DELIVERY)
        last_age = None
        if last is not None:
            try:
                stamp = float(last)
            except ValueError:
                stamp = math.nan
            if math.isfinite(stamp):
                last_age = max(0.0, now - stamp)
    return BrokerState(queue, oldest_age, in_flight, nodes, dead, dead_new, last_age, spools)


def broker_failure(broker: Broker, exc: BaseException) -> tuple[int, str]:
    """What a broker's failure means, in words (never a traceback, never a password)."""
    where = broker.where
    if isinstance(exc, ReplyError):
        if exc.code in ("WRONGPASS", "NOAUTH", "INVALIDPASSWORD") or (
            exc.code == "ERR" and "AUTH" in str(exc).upper()
        ):
            return CRITICAL, f"broker {where} refused authentication ({exc.code})"
        if exc.code == "NOPERM":
            return CRITICAL, f"broker {where} refused a command (NOPERM): check the user's ACL"
        return UNKNOWN, f"broker {where} answered an error ({exc.code})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CRITICAL, f"broker {where}: TLS verification failed ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return CRITICAL, f"broker {where}: TLS failed ({type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        return CRITICAL, f"broker {where} unreachable (timeout)"
    if isinstance(exc, OSError | ProtocolError):
        return CRITICAL, f"broker {where} unreachable ({type(exc).__name__})"
    return UNKNOWN, f"broker {where}: unexpected {type(exc).__name__}"
