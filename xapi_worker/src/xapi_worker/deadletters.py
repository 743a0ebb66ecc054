"""Dead letters: one JSON object per statement the worker gives up on (:class:`DeadLetter`).

A node with a spool keeps them on its host's disk, in its spool file (deadstore.py). The
broker's list (``XAPI_WORKER_DEAD_LETTER_KEY``, default ``xapi.dead_letters``), where they
were kept before, is still where a node without a spool writes them; the nodes with a spool
move what it holds to their disk (deadstore.move_legacy), and ``xapi-worker dead-letters``
reads both. :class:`RedisAccess` is the broker's side: that list, the last delivery, the
status."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .content import json_text
from .delivery import iso, parse_iso
from .names import (
    INFLIGHT,
    QUEUE,
    SPOOL_FIELDS,
    UNACKED,
    alive_key,
    dead_claim_key,
    inflight_key,
    registry_key,
    replay_node,
    unreadable_key,
)
from .names import LAST_DELIVERY as LAST_DELIVERY_KEY
from .names import SPOOL as SPOOL_SUFFIX
from .redisclient import ForkSafeRedis
from .retention import unreadable_oldest
from .scripts import Scripts, claim_one, move_all, push, set_value
from .settings import Settings

log = logging.getLogger("xapi_worker")

#: Dead letters read at once by purge_older.
PURGE_CHUNK = 500
#: A dead letter dated further ahead than this (a node whose clock is wrong) is read past
#: by purge_older, as one without a readable time: it does not hold back the rest.
CLOCK_SKEW_SECONDS = 3600.0
#: Timeouts of the connection that records the last delivery: a slow or gone broker must not
#: hold a delivered batch for long (the acknowledgements then wait for it anyway).
NOTE_TIMEOUT = 1.0


@dataclass
class DeadLetter:
    """One statement the worker gives up on, with why; kept until replayed or purged."""

    statement: dict[str, Any]
    reason: str
    task_id: str
    status: int | None = None  # the LRS's HTTP status, if it answered
    response: str = ""  # the start of its answer (masked), or the error
    attempts: int = 1
    first_seen: float | None = None  # epoch seconds
    conflict: dict[str, Any] | None = None  # a 409: digests of ours and of the stored one

    def entry(self) -> dict[str, Any]:
        now = time.time()
        entry = {
            "statement": self.statement,
            "reason": self.reason,
            "status": self.status,
            "response": self.response,
            "time": iso(now),
            "task_id": self.task_id,
            "attempts": self.attempts,
            "first_seen": iso(self.first_seen if self.first_seen is not None else now),
        }
        if self.conflict is not None:
            entry["conflict"] = self.conflict
        return entry


STATUS_FIELDS = (
    "queue",
    "dead_letters",
    "dead_letters_broker",
    "unacked",
    "in_flight",
    "unreadable",
    "spool",
    "spool_bytes",
    "spool_damaged",
)


class RedisAccess:
    """A redis-py client on the broker URL, rebuilt after a fork."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client = ForkSafeRedis(settings.broker_url, 10, connect_timeout=5)
        self._quick = ForkSafeRedis(settings.broker_url, NOTE_TIMEOUT)

    def __repr__(self) -> str:
        return f"RedisAccess({self._settings.broker_url_masked!r})"

    @property
    def client(self) -> redis.Redis:
        return self._client.get()

    @property
    def quick_client(self) -> redis.Redis:
        """A client of its own with short timeouts, for best-effort writes."""
        return self._quick.get()

    def note_delivery(self, when: float | None = None) -> None:
        """SET ``xapi.last_delivery`` to ``when`` (epoch seconds, default now): once per batch
        the LRS accepted. Best effort: a failure is logged at debug level, never raised."""
        value = repr(time.time() if when is None else float(when))
        try:
            set_value(self.quick_client, LAST_DELIVERY_KEY, value)
        except Exception:
            log.debug("%s not recorded", LAST_DELIVERY_KEY, exc_info=True)

    @property
    def key(self) -> str:
        return self._settings.dead_letter_key

    def add(self, letter: DeadLetter) -> None:
        # A dead letter replaces the message that is then acknowledged: written at maxmemory
        # too, or the statement would go round until the broker has room (scripts.py).
        # json_text: any statement's dead letter can be written (content.py).
        push(self.client, self.key, [json_text(letter.entry())], left=False)

    def entries(self) -> Iterator[tuple[bytes, dict[str, Any]]]:
        raws: list[bytes] = self.client.lrange(self.key, 0, -1)  # type: ignore[assignment]
        for raw in raws:
            try:
                yield raw, json.loads(raw)
            except ValueError:
                yield raw, {"unparsable": raw.decode("utf-8", "replace")}

    def remove(self, raw: bytes) -> int:
        return int(self.client.lrem(self.key, 1, raw))  # type: ignore[arg-type]

    def purge_older(self, days: float, now: float | None = None) -> int:
        """Remove the dead letters written more than ``days`` ago (their ``time``), oldest
        first (the list's head: each is appended), a chunk at a time, stopping at the first
        one written since: the list is never read whole. An entry without a readable time,
        or dated in the future (a node's clock ahead: it would hold back every later one), is
        kept and read past. Returns how many were removed."""
        now = time.time() if now is None else now
        limit = now - days * 86400
        removed = 0
        start = 0  # entries kept at the head (no readable time)
        while True:
            raws: list[bytes] = self.client.lrange(self.key, start, start + PURGE_CHUNK - 1)  # type: ignore[assignment]
            if not raws:
                return removed
            for raw in raws:
                try:
                    entry = json.loads(raw)
                except (ValueError, RecursionError):
                    entry = None
                written = parse_iso(entry.get("time")) if isinstance(entry, dict) else None
                if written is None or written > now + CLOCK_SKEW_SECONDS:
                    start += 1
                elif written < limit:
                    removed += int(self.client.lrem(self.key, 1, raw))  # type: ignore[arg-type]
                else:
                    return removed

    def purge(self) -> int:
        pipe = self.client.pipeline()
        pipe.llen(self.key)
        pipe.delete(self.key)
        count, _ = pipe.execute()  # type: ignore[no-untyped-call]
        return int(count)

    def status(self) -> dict[str, Any]:
        client = self.client
        members: set[bytes] = client.smembers(registry_key(QUEUE))  # type: ignore[assignment]
        lists = sorted(m.decode() for m in members)
        pipe = client.pipeline()
        pipe.llen(QUEUE)
        pipe.llen(self.key)
        pipe.hlen(UNACKED)
        pipe.llen(unreadable_key(QUEUE))
        for key in lists:
            pipe.llen(key)
        # HGET field by field: the worker's ACL grants HGET, not HGETALL.
        for key in lists:
            for name in SPOOL_FIELDS:
                pipe.hget(key + SPOOL_SUFFIX, name)
        replies = pipe.execute()  # type: ignore[no-untyped-call]
        queue, dead, unacked, unreadable = replies[:4]
        in_flight = replies[4 : 4 + len(lists)]
        values = replies[4 + len(lists) :]
        spools: list[tuple[str, dict[str, str]]] = []
        for n, key in enumerate(lists):
            got = values[n * len(SPOOL_FIELDS) : (n + 1) * len(SPOOL_FIELDS)]
            fields = {
                f: v.decode() for f, v in zip(SPOOL_FIELDS, got, strict=True) if v is not None
            }
            if fields:
                spools.append((key, fields))
        state: dict[str, Any] = {
            "queue": int(queue),
            # on the nodes' disks (as they publish it) and in the broker's list
            "dead_letters": int(dead) + sum(int(h.get("dead_letters") or 0) for _, h in spools),
            "dead_letters_broker": int(dead),
            "unacked": int(unacked),
            # taken by a node, not yet recorded in unacked: returned when the node restarts
            "in_flight": sum(int(n) for n in in_flight),
            "unreadable": int(unreadable),
            # the oldest one's age, once dated for the retention rule (retention.py)
            "unreadable_oldest_age_s": _age(unreadable_oldest(client, unreadable_key(QUEUE))),
        }
        state.update(spool_summary(spools))
        return state


class ReplayClaim:
    """How ``dead-letters replay`` takes the elements of the broker's list, one at a time:
    each is moved to the run's claim list (``xapi.inflight.replay-<run>@<host>.dead_letters``,
    names.replay_node) before its statement is sent, and the claim list deleted after. An
    element another process took since the replay read the list (a node's drainer moving it
    to its disk, another replay, a purge) is found missing: not sent, counted
    (:meth:`take` is False).

    The run registers as a node (the registry of in-flight lists, a heartbeat refreshed while
    it runs, expiring after ``ttl`` seconds), as a worker node does for its own claim list
    (deadstore.move_legacy): a replay killed between the claim and the deletion leaves its
    claim (one element) where ``forget`` reads it and where any worker node, once the
    heartbeat has expired, puts it back at the head of the broker's list
    (transport.recover_orphans). A replay that ends puts an element it claimed and did not
    send back there itself, then leaves the registry."""

    def __init__(self, client: redis.Redis, key: str, ttl: int, host: str | None = None) -> None:
        self.client = client
        self.key = key  # the broker's dead letters (XAPI_WORKER_DEAD_LETTER_KEY)
        self.ttl = max(30, int(ttl))
        run = f"{os.getpid()}.{secrets.token_hex(4)}"
        self.node = replay_node(run, host or socket.gethostname())
        self.member = inflight_key(QUEUE, self.node)
        self.claim = dead_claim_key(QUEUE, self.node)
        self._next_beat: float | None = None  # monotonic; None: not registered

    def __enter__(self) -> ReplayClaim:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _beat(self) -> None:
        now = time.monotonic()
        if self._next_beat is None or now >= self._next_beat:
            Scripts(self.client).heartbeat(
                keys=[alive_key(self.member), registry_key(QUEUE)],
                args=[self.node, self.ttl, self.member],
                client=self.client,
            )
            self._next_beat = now + self.ttl / 3

    def take(self, raw: bytes) -> bool:
        """Claim ``raw``; False when the broker's list holds it no more."""
        self._beat()
        return claim_one(self.client, self.key, self.claim, raw)

    def done(self) -> int:
        """The claimed element was sent: its dead letter is gone."""
        return int(self.client.delete(self.claim))  # type: ignore[arg-type]

    def close(self) -> None:
        if self._next_beat is None:
            return
        back = move_all(self.client, self.claim, self.key, "RIGHT", "LEFT")
        if back:
            log.warning("%d claimed dead letter(s) not replayed: back on %s", back, self.key)
        self.client.delete(alive_key(self.member))
        self.client.srem(registry_key(QUEUE), self.member)
        self._next_beat = None


def _age(since: float | None) -> float | None:
    return None if since is None else round(time.time() - since, 1)


def spool_summary(spools: list[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    """The spools of a broker's nodes in a few numbers, from the state each node publishes
    (drain.py): statements spooled, the oldest one's age, bytes, full nodes, damaged files."""
    now = time.time()
    oldest = [float(h["oldest"]) for _, h in spools if h.get("oldest")]
    prefix = len(QUEUE + INFLIGHT + ".")
    set_aside = [float(h["damaged_since"]) for _, h in spools if h.get("damaged_since")]
    dead_oldest = [float(h["dead_oldest"]) for _, h in spools if h.get("dead_oldest")]
    return {
        "spool": sum(int(h.get("depth") or 0) for _, h in spools),
        "spool_oldest_age_s": round(now - min(oldest), 1) if oldest else None,
        "spool_bytes": sum(int(h.get("bytes") or 0) for _, h in spools),
        "spool_full": sorted(key[prefix:] for key, h in spools if h.get("full") == "1"),
        "spool_damaged": sum(int(h.get("damaged") or 0) for _, h in spools),
        # set aside as damaged, not drained yet: `xapi-worker spool drain` on their host
        "spool_damaged_files": sorted(
            f"{key[prefix:]}: {name}"
            for key, h in spools
            for name in (h.get("damaged_files") or "").split()
        ),
        "spool_damaged_age_s": round(now - min(set_aside), 1) if set_aside else None,
        # the nodes' dead letters on their disks (deadstore.py)
        "dead_letters_new": sum(int(h.get("dead_new") or 0) for _, h in spools),
        "dead_letters_oldest_age_s": round(now - min(dead_oldest), 1) if dead_oldest else None,
        "dead_letters_full": sorted(key[prefix:] for key, h in spools if h.get("dead_full") == "1"),
    }
