#!/usr/bin/python3
"""check_xapi: a Nagios-convention check of Esup-Pod's xAPI pipeline.

Per Redis broker (the frontal's ``redis-server@xapi``): the queue, the age of its oldest
statement, what the workers hold in flight, the worker nodes alive, the dead letters and
the time since the last batch the LRS accepted; and the LRS itself (``GET statements?limit=1``).
One status line, performance data, exit code 0/1/2/3 (roles/xapi_ops README, "check_xapi").
With ``--prometheus FILE``, the same readings plus the worker's counters (the hash
``xapi.metrics`` the workers keep in the broker) as a file of Prometheus' text format, for
node_exporter's textfile collector (roles/xapi_ops README, "Metrics").

Standard library only (Python 3.11 and later): it runs on hosts without the worker's venv.
It reads its JSON configuration file and talks to the network, nothing else.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import math
import os
import re
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NoReturn
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

VERSION = "1.0.0"
DEFAULT_CONFIG = "/etc/xapi-monitoring/check_xapi.json"
XAPI_VERSION = "1.0.3"

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

# The worker's keys (xapi_worker: settings.py, transport.py, deadletters.py).
QUEUE = "xapi"
UNACKED = "unacked"
REGISTRY = QUEUE + ".inflight"  # set of the nodes' in-flight lists
ALIVE = ".alive"  # <in-flight list>.alive: a node's heartbeat
DEAD_LETTERS = "xapi.dead_letters"
LAST_DELIVERY = "xapi.last_delivery"
METRICS_KEY = "xapi.metrics"
SPOOL = ".spool"  # <in-flight list>.spool: a node's on-disk spool, as its worker reports it
#: A spool hash older than this while the node's heartbeat lives: the worker (rewriting it
#: every 5 s) no longer reports, so its readings can no longer be trusted.
SPOOL_STALE = 60.0

#: Dead letters read at most to count the new ones (newest first), and per LRANGE.
DEAD_READ_CAP = 10_000
DEAD_READ_CHUNK = 500
#: Longest RESP reply line or bulk string accepted (a runaway reply is an error).
MAX_BULK = 64 * 1024 * 1024

#: Metrics whose value is bad when high: alert at or above warning / critical.
HIGH_METRICS = (
    "queue",
    "oldest_age",
    "in_flight",
    "dead_letters",
    "dead_new",
    "last_delivery_age",
    "spool_depth",
    "spool_age",
    "spool_used",
)
#: ``nodes`` is a minimum: alert below warning / critical.
MIN_METRICS = ("nodes",)
METRICS = (*HIGH_METRICS, *MIN_METRICS, "lrs")
AGE_METRICS = ("oldest_age", "last_delivery_age", "spool_age")
PERCENT_METRICS = ("spool_used",)
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {
    "queue": (1000, 10000),
    "oldest_age": (300, 1800),
    "in_flight": (500, 2000),
    "dead_letters": (1, 100),
    "dead_new": (1, 10),
    "last_delivery_age": (600, 3600),
    "nodes": (1, 0),
    # The spool holds what the LRS refused to take: any depth means an LRS outage under way.
    # A short one (a restart) spools a few hundred statements at Pod's usual rates, hence a
    # warning from 1000 and critical only at 100000, where a long outage becomes costly to
    # drain. By age: 15 min is longer than any restart (warning), a day means nobody acted
    # (critical). By use of max_bytes: half full leaves time to act, at 90 % the node is
    # about to stop taking from the broker (full, itself CRITICAL whatever the thresholds).
    "spool_depth": (1000, 100000),
    "spool_age": (900, 86400),
    "spool_used": (50, 90),
}


class ConfigError(Exception):
    """The configuration or the command line is wrong: UNKNOWN, naming the key."""


# --- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Broker:
    name: str
    host: str
    port: int = 6380
    db: int = 6
    user: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False
    ca: str = ""
    dead_letter_key: str = DEAD_LETTERS

    @property
    def where(self) -> str:
        """How the broker is named in messages (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return f"{self.name} ({scheme}://{host}:{self.port}/{self.db})"


@dataclass(frozen=True)
class LRS:
    url: str
    login: str
    password: str = field(repr=False)
    ca: str = ""


@dataclass
class Config:
    brokers: list[Broker]
    lrs: LRS | None
    nodes_expected: int
    thresholds: dict[str, tuple[float, float]]
    dead_window: float
    timeout: float

    def secrets(self) -> list[str]:
        found = [b.password for b in self.brokers]
        if self.lrs is not None:
            found.append(self.lrs.password)
        return [s for s in found if s]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _object(value: object, where: str, known: dict[str, bool]) -> dict[str, Any]:
    """``value`` as a JSON object whose keys are all in ``known`` (name -> required)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object")
    for key in value:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}")
    for key, required in known.items():
        if required and key not in value:
            raise ConfigError(f"{where}: {key} is required")
    return value


def _str(obj: dict[str, Any], key: str, where: str, default: str = "", empty: bool = True) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key} must be a string")
    if not empty and not value:
        raise ConfigError(f"{where}.{key} must not be empty")
    return value


def _int(obj: dict[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    value = obj.get(key, default)
    if not _is_int(value):
        raise ConfigError(f"{where}.{key} must be an integer")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{key} must be between {lo} and {hi}")
    return int(value)


def _positive(obj: dict[str, Any], key: str, where: str, default: float) -> float:
    value = obj.get(key, default)
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{where}.{key} must be a number greater than 0")
    return float(value)


def check_pair(name: str, warn: float, crit: float, where: str) -> None:
    """Refuse a warning threshold beyond the critical one (for ``nodes``, a minimum: below)."""
    if name in MIN_METRICS:
        if warn < crit:
            raise ConfigError(
                f"{where}: the warning threshold of {name} ({warn:g}) is below "
                f"the critical one ({crit:g}); nodes is a minimum"
            )
    elif warn > crit:
        raise ConfigError(
            f"{where}: the warning threshold of {name} ({warn:g}) is above the critical one "
            f"({crit:g})"
        )
    if warn < 0 or crit < 0:
        raise ConfigError(f"{where}: the thresholds of {name} must not be negative")


def _broker(value: object, where: str) -> Broker:
    obj = _object(
        value,
        where,
        {
            "name": True,
            "host": True,
            "port": False,
            "db": False,
            "user": False,
            "password": False,
            "tls": False,
            "ca": False,
            "dead_letter_key": False,
        },
    )
    name = _str(obj, "name", where, empty=False)
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"{where}.name may hold letters, digits, '-', '_' and '.' only")
    tls = obj.get("tls", False)
    if not isinstance(tls, bool):
        raise ConfigError(f"{where}.tls must be true or false")
    return Broker(
        name=name,
        host=_str(obj, "host", where, empty=False),
        port=_int(obj, "port", where, 6380, 1, 65535),
        db=_int(obj, "db", where, 6, 0, 1 << 31),
        user=_str(obj, "user", where),
        password=_str(obj, "password", where),
        tls=tls,
        ca=_str(obj, "ca", where),
        dead_letter_key=_str(obj, "dead_letter_key", where, DEAD_LETTERS, empty=False),
    )


def _lrs(value: object) -> LRS:
    where = "lrs"
    obj = _object(value, where, {"url": True, "login": True, "password": True, "ca": False})
    url = _str(obj, "url", where, empty=False)
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError("lrs.url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("lrs.url must be an http or https URL with a host")
    if "@" in parts.netloc:
        raise ConfigError("lrs.url must not hold credentials: use lrs.login and lrs.password")
    return LRS(
        url=url,
        login=_str(obj, "login", where, empty=False),
        password=_str(obj, "password", where),
        ca=_str(obj, "ca", where),
    )


def _thresholds(value: object) -> dict[str, tuple[float, float]]:
    obj = _object(value, "thresholds", {name: False for name in DEFAULT_THRESHOLDS})
    out = dict(DEFAULT_THRESHOLDS)
    for name, pair in obj.items():
        where = f"thresholds.{name}"
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(v) for v in pair):
            raise ConfigError(f"{where} must be a list of two numbers [warning, critical]")
        warn, crit = float(pair[0]), float(pair[1])
        check_pair(name, warn, crit, where)
        out[name] = (warn, crit)
    return out


def parse_config(data: object) -> Config:
    obj = _object(
        data,
        "config",
        {
            "brokers": True,
            "lrs": False,
            "nodes_expected": False,
            "thresholds": False,
            "dead_window": False,
            "timeout": False,
        },
    )
    raw_brokers = obj["brokers"]
    if not isinstance(raw_brokers, list) or not raw_brokers:
        raise ConfigError("brokers must be a non-empty list")
    brokers = [_broker(b, f"brokers[{n}]") for n, b in enumerate(raw_brokers)]
    names = [b.name for b in brokers]
    if len(set(names)) != len(names):
        raise ConfigError("brokers: each name must be unique")
    return Config(
        brokers=brokers,
        lrs=_lrs(obj["lrs"]) if "lrs" in obj else None,
        nodes_expected=_int(obj, "nodes_expected", "config", 1, 0, 10_000),
        thresholds=_thresholds(obj.get("thresholds", {})),
        dead_window=_positive(obj, "dead_window", "config", 86400),
        timeout=_positive(obj, "timeout", "config", 5),
    )


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # the position only: the message never quotes the text (a password may be there)
        raise ConfigError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    return parse_config(data)


# --- a minimal Redis client (RESP2) ----------------------------------------------------------
class ReplyError(Exception):
    """An error reply of the server (``-ERR ...``, ``-WRONGPASS ...``)."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class ProtocolError(Exception):
    """Not a RESP2 answer, or the connection closed mid-reply."""


Reply = None | int | bytes | str | list["Reply"]


class Redis:
    """One connection: AUTH, SELECT, then one command at a time."""

    def __init__(self, broker: Broker, timeout: float) -> None:
        sock = socket.create_connection((broker.host, broker.port), timeout=timeout)
        try:
            sock.settimeout(timeout)
            if broker.tls:
                context = ssl.create_default_context(cafile=broker.ca or None)
                sock = context.wrap_socket(sock, server_hostname=broker.host)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._file = sock.makefile("rb")
        try:
            if broker.password:
                if broker.user:
                    self.call("AUTH", broker.user, broker.password)
                else:
                    self.call("AUTH", broker.password)
            self.call("SELECT", str(broker.db))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()

    def __enter__(self) -> Redis:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, *args: str) -> Reply:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(out))
        return self._read()

    def _line(self) -> bytes:
        line = self._file.readline(MAX_BULK)
        if not line.endswith(b"\r\n"):
            raise ProtocolError("connection closed or reply line too long")
        return line[:-2]

    def _read(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            raise ReplyError(rest.decode("utf-8", "replace"))
        try:
            number = int(rest)
        except ValueError:
            raise ProtocolError("not a RESP2 reply") from None
        if kind == b":":
            return number
        if kind == b"$":
            if number < 0:
                return None
            if number > MAX_BULK:
                raise ProtocolError("bulk reply too large")
            data = self._file.read(number + 2)
            if len(data) != number + 2 or not data.endswith(b"\r\n"):
                raise ProtocolError("connection closed mid-reply")
            return data[:-2]
        if kind == b"*":
            if number < 0:
                return None
            return [self._read() for _ in range(number)]
        raise ProtocolError("not a RESP2 reply")

    def integer(self, *args: str) -> int:
        reply = self.call(*args)
        if not isinstance(reply, int):
            raise ProtocolError(f"{args[0]} did not answer an integer")
        return reply

    def bulk(self, *args: str) -> bytes | None:
        reply = self.call(*args)
        if reply is not None and not isinstance(reply, bytes):
            raise ProtocolError(f"{args[0]} did not answer a bulk string")
        return reply

    def bulks(self, *args: str) -> list[bytes]:
        reply = self.call(*args)
        if not isinstance(reply, list) or not all(isinstance(r, bytes) for r in reply):
            raise ProtocolError(f"{args[0]} did not answer a list of strings")
        return [r for r in reply if isinstance(r, bytes)]


# --- what a broker holds ---------------------------------------------------------------------
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


def read_spool(client: Redis, member: str, alive: bool, now: float) -> NodeSpool | None:
    """The spool of the node whose in-flight list is ``member``; None without its hash (a
    node with the spool off, or a worker older than the spool)."""
    pairs = client.bulks("HGETALL", member + SPOOL)
    if not pairs:
        return None
    fields = {
        pairs[i].decode("utf-8", "replace"): pairs[i + 1] for i in range(0, len(pairs) - 1, 2)
    }
    oldest = _field_float(fields, "oldest")
    updated = _field_float(fields, "updated")
    damaged_since = _field_float(fields, "damaged_since")
    return NodeSpool(
        node=member.removeprefix(REGISTRY + "."),
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
    )


def _field_text(fields: dict[str, bytes], name: str) -> str:
    return fields.get(name, b"").decode("ascii", "replace")


def _plain(name: str) -> str:
    """A file name as the worker writes it (spool.node_file), anything else replaced: the
    plugin's output line stays one line of plain text whatever the hash holds."""
    return re.sub(r"[^A-Za-z0-9@._-]", "_", name)[:200]


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


def count_new_dead(client: Redis, key: str, total: int, since: float) -> int:
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
    with Redis(broker, timeout) as client:
        now = time.time()
        queue = client.integer("LLEN", QUEUE)
        oldest_age = None
        if queue:
            raw = client.bulk("LINDEX", QUEUE, "-1")
            when = statement_time(raw) if raw is not None else None
            if when is not None:
                oldest_age = max(0.0, now - when)
        members = sorted(m.decode("utf-8", "replace") for m in client.bulks("SMEMBERS", REGISTRY))
        in_flight = client.integer("HLEN", UNACKED)
        nodes = 0
        spools = []
        for member in members:
            in_flight += client.integer("LLEN", member)
            alive = bool(client.integer("EXISTS", member + ALIVE))
            nodes += 1 if alive else 0
            spool = read_spool(client, member, alive, now)
            if spool is not None:
                spools.append(spool)
        dead = client.integer("LLEN", broker.dead_letter_key)
        dead_new = count_new_dead(client, broker.dead_letter_key, dead, now - dead_window)
        last = client.bulk("GET", LAST_DELIVERY)
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


# --- the LRS ---------------------------------------------------------------------------------
def statements_query_url(lrs_url: str, query: str) -> str:
    """``lrs_url`` with ``query`` added to its own query (as xapi_worker/lrs.py builds it)."""
    parts = urlsplit(lrs_url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, parts.fragment))


def mask_url(url: str) -> str:
    """``url`` without the password of its userinfo."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:****@{hostport}", parts.path, parts.query, ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:  # noqa: ANN401 (urllib's signature)
        return None  # a 3xx is an answer to report, not to follow


@dataclass
class LRSState:
    state: int
    text: str
    status: int | None = None
    seconds: float | None = None


def probe_lrs(lrs: LRS, timeout: float) -> LRSState:
    url = statements_query_url(lrs.url, "limit=1")
    token = base64.b64encode(f"{lrs.login}:{lrs.password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked: http or https)
        url,
        headers={
            "Authorization": f"Basic {token}",
            "X-Experience-API-Version": XAPI_VERSION,
            "Accept": "application/json",
        },
    )
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=lrs.ca or None)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    started = time.monotonic()
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
            body = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
        exc.close()
        seconds = time.monotonic() - started
        if status in (401, 403):
            return LRSState(CRITICAL, f"LRS credentials refused (HTTP {status})", status, seconds)
        return LRSState(WARNING, f"LRS answered HTTP {status}", status, seconds)
    except urllib.error.URLError as exc:
        return LRSState(CRITICAL, f"LRS unreachable ({_reason(exc.reason)})")
    except TimeoutError:
        return LRSState(CRITICAL, "LRS unreachable (timeout)")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # a reset, a garbled answer
        return LRSState(CRITICAL, f"LRS unreachable ({_reason(exc)})")
    seconds = time.monotonic() - started
    if status != 200:
        return LRSState(WARNING, f"LRS answered HTTP {status}", status, seconds)
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return LRSState(WARNING, "LRS answered HTTP 200 with a body that is not JSON", 200, seconds)
    return LRSState(OK, "LRS HTTP 200", 200, seconds)


def _reason(reason: object) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {reason.verify_message}"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed: {type(reason).__name__}"
    if isinstance(reason, TimeoutError):
        return "timeout"
    if isinstance(reason, OSError):
        return reason.strerror or type(reason).__name__
    return type(reason).__name__ if isinstance(reason, BaseException) else str(reason)


# --- evaluation and output -------------------------------------------------------------------
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


# --- Prometheus: node_exporter's textfile collector ----------------------------------------
# The workers' counters live in the broker (xapi_worker/README.md, "Metrics"): one hash per
# broker, whatever the hosts, nodes and pool processes that delivered. Counter fields and the
# families they become; histogram fields are `<name>_bucket:<le>`, `<name>_sum`, `<name>_count`.
COUNTER_FIELDS = {
    "delivered": ("xapi_statements_delivered_total", "Statements the LRS accepted (verified)."),
    "retried": ("xapi_statements_retried_total", "Statements scheduled for a retry."),
    "dead_lettered": ("xapi_statements_dead_lettered_total", "Statements dead-lettered."),
    "spooled": (
        "xapi_statements_spooled_total",
        "Statements moved from the broker into a node's on-disk spool.",
    ),
}
RESPONSES = ("xapi_lrs_responses_total", "LRS answers by HTTP status (error: none).")
HISTOGRAMS = {
    "batch_size": ("xapi_batch_size", "Statements per POST to the LRS."),
    "lrs_latency_seconds": ("xapi_lrs_latency_seconds", "Duration of each POST to the LRS."),
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
            with Redis(broker, config.timeout) as client:
                pairs = client.bulks("HGETALL", METRICS_KEY)
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
        fields = {
            pairs[i].decode("utf-8", "replace"): pairs[i + 1] for i in range(0, len(pairs) - 1, 2)
        }
        for field_name, family in COUNTER_FIELDS.items():
            number = _value(fields.get(field_name, b"0"))
            sample(family, "counter", family[0], label, number or 0)
        for field_name, raw in sorted(fields.items()):
            status = field_name.removeprefix("lrs_responses:")
            if status != field_name and STATUS_TEXT.fullmatch(status):
                number = _value(raw)
                if number is not None:
                    labels = f'{label},status="{status}"'
                    sample(RESPONSES, "counter", RESPONSES[0], labels, number)
        for prefix, family in HISTOGRAMS.items():
            buckets = []
            for field_name, raw in fields.items():
                bound = _le(field_name.removeprefix(prefix + "_bucket:"))
                if field_name.startswith(prefix + "_bucket:") and bound is not None:
                    number = _value(raw)
                    if number is not None:
                        buckets.append((bound[0], bound[1], number))
            if not buckets:
                continue
            for _, text, number in sorted(buckets):
                labels = f'{label},le="{text}"'
                sample(family, "histogram", family[0] + "_bucket", labels, number)
            for suffix in ("_sum", "_count"):
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


# --- command line ----------------------------------------------------------------------------
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("XAPI UNKNOWN - interrupted")
        sys.exit(UNKNOWN)
