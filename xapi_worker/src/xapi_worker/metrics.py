"""Pipeline counters, kept in the broker: the Redis hash ``xapi.metrics`` (broker db).

Why in the broker and not in the process: delivery runs in Celery pool processes, several
nodes on several hosts share one broker, and the counters must survive a worker restart and
match what was delivered. A per-process registry would be reset by every restart and
scattered over pool processes and hosts; the hash is one set of counters for the whole
pipeline, which an exporter reads (HGETALL) and turns into Prometheus text.

Each processed batch sends its increments in one MULTI/EXEC pipeline of HINCRBY and
HINCRBYFLOAT (never a round trip per statement); the transaction makes a batch's increments
visible together, so a reader never sees a histogram whose buckets and count disagree.

Best effort: recording never raises, never delays a delivery by more than the short socket
timeout below and is never a reason to put a message back. When the broker refuses
(``maxmemory``, a missing ACL right) or cannot be reached, the increments are kept in the
process and added to the next batch's, tried again after :data:`RETRY_AFTER_SECONDS`; a
warning is logged at most once per :data:`WARN_EVERY_SECONDS`. After a timeout the broker may
have applied them (a stalled broker resuming): they are dropped rather than counted twice.

Fields (``<le>`` the bucket bounds below, cumulative as Prometheus histograms are):
``delivered``, ``retried``, ``dead_lettered``, ``spooled`` (moved into a spool),
``lrs_responses:<status>`` (``error`` when there was no answer), ``batch_size_bucket:<le>``,
``batch_size_sum``, ``batch_size_count``,
``lrs_latency_seconds_bucket:<le>``, ``lrs_latency_seconds_sum``,
``lrs_latency_seconds_count``. A batch is one POST to the LRS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import redis

from .names import BATCH_SIZE, BUCKET, COUNT, LRS_LATENCY, RESPONSES_PREFIX, SUM
from .names import METRICS as KEY
from .redisclient import ForkSafeRedis
from .settings import Settings

log = logging.getLogger("xapi_worker.metrics")

BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 5, 10, 25, 50, 100, 250, 500)
LATENCY_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SOCKET_TIMEOUT = 1.0  # seconds: the longest a recording may hold a batch
RETRY_AFTER_SECONDS = 10.0  # after a failure, no attempt before this long
WARN_EVERY_SECONDS = 60.0


def _le(bound: float) -> str:
    return f"{bound:g}"


def bucket_fields(name: str, bounds: Sequence[float], value: float) -> list[str]:
    """The cumulative bucket fields a value falls in: every ``le >= value``, and ``+Inf``."""
    fields = [f"{name}{BUCKET}{_le(b)}" for b in bounds if value <= b]
    fields.append(f"{name}{BUCKET}+Inf")
    return fields


def response_field(status: int | None) -> str:
    return f"{RESPONSES_PREFIX}{'error' if status is None else status}"


class Metrics:
    """Increments of one process, sent to the broker by :meth:`flush` (once per batch).

    Safe to create before a fork: the Redis client is (re)built in the process using it."""

    def __init__(self, settings: Settings, key: str = KEY) -> None:
        self._settings = settings
        self.key = key
        self._client: ForkSafeRedis | None = None  # made on first use
        self._ints: dict[str, int] = {}
        self._floats: dict[str, float] = {}
        self._next_try = 0.0  # monotonic
        self._warned_at: float | None = None  # monotonic

    def __repr__(self) -> str:
        return f"Metrics({self._settings.broker_url_masked!r}, {self.key!r})"

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = ForkSafeRedis(self._settings.broker_url, SOCKET_TIMEOUT)
        return self._client.get()

    @property
    def pending(self) -> dict[str, float]:
        """Increments not yet in the broker (for tests and logs)."""
        return {**self._ints, **self._floats}

    # --- what happened -------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        if n:
            self._ints[name] = self._ints.get(name, 0) + n

    def observe_post(self, size: int, status: int | None, latency_seconds: float) -> None:
        """One POST to the LRS: its answer, its batch size, its duration."""
        latency = max(0.0, latency_seconds)
        fields = [
            response_field(status),
            *bucket_fields(BATCH_SIZE, BATCH_SIZE_BUCKETS, size),
            BATCH_SIZE + COUNT,
            *bucket_fields(LRS_LATENCY, LATENCY_BUCKETS, latency),
            LRS_LATENCY + COUNT,
        ]
        for name in fields:
            self.count(name)
        self.count(BATCH_SIZE + SUM, size)
        total = LRS_LATENCY + SUM
        self._floats[total] = self._floats.get(total, 0.0) + latency

    # --- to the broker ---------------------------------------------------------------------
    def flush(self) -> bool:
        """Send what is pending in one pipeline; True when the broker has it. Never raises."""
        if not self._ints and not self._floats:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        ints, floats = self._ints, self._floats
        self._ints, self._floats = {}, {}
        try:
            pipe = self.client.pipeline(transaction=True)
            for name, n in ints.items():
                pipe.hincrby(self.key, name, n)
            for name, x in floats.items():
                pipe.hincrbyfloat(self.key, name, x)
            # An EXEC refused as a whole (maxmemory refuses MULTI) raises: nothing applied.
            # A command failing inside it (a field that is not a number) does not undo the
            # others: its error comes back in its place, and only it was not applied.
            replies = pipe.execute(raise_on_error=False)  # type: ignore[no-untyped-call]
        except redis.TimeoutError as exc:
            # Sent, maybe applied by a broker that resumes: dropped, not counted twice.
            self._failed(now, exc, "these increments are dropped")
            return False
        except Exception as exc:  # refused or unreachable: kept for the next batch
            for name, n in ints.items():
                self.count(name, n)
            for name, x in floats.items():
                self._floats[name] = self._floats.get(name, 0.0) + x
            self._failed(now, exc, "kept for the next batch")
            return False
        names = [*ints, *floats]
        refused = [
            f"{name}: {reply}"
            for name, reply in zip(names, replies, strict=True)
            if isinstance(reply, Exception)
        ]
        if refused:
            # Sent again it would fail again: dropped, the rest is counted once.
            self._failed(now, redis.ResponseError("; ".join(refused)), "these fields are dropped")
            return False
        return True

    def _masked(self, text: str) -> str:
        password = urlsplit(self._settings.broker_url).password
        if password:
            for form in {password, unquote(password)}:
                text = text.replace(form, "****")
        return text

    def _failed(self, now: float, exc: BaseException, fate: str) -> None:
        self._next_try = now + RETRY_AFTER_SECONDS
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY_SECONDS:
            return
        self._warned_at = now
        log.warning(
            "cannot record metrics in %s (%s: %s): %s; deliveries go on "
            "(this warning at most once a minute)",
            self.key,
            type(exc).__name__,
            self._masked(str(exc))[:200],
            fate,
        )
