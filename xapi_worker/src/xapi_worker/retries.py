"""Where a retry goes: the ``settle.Retries`` of a live batch and of the drainer.

- :class:`Republish` (live, spool off): each statement goes back to the task queue as a new
  message with a countdown, its attempt, first seen and lone failures signed in its headers
  (bookkeeping.py). One countdown for the group, so its statements come back together.
- :class:`ToSpool` (live, spool on): the statements are committed to the node's spool with
  the time of their next attempt; their messages are acknowledged only then.
- :class:`Reschedule` (the drainer, ``xapi-worker spool drain``): the spooled rows get the
  time of their next attempt.

The delay is the live backoff (``delivery.retry_delay``), bounded by
``XAPI_WORKER_RETRY_MAX_SECONDS`` so that a countdown message comes back within the
visibility timeout; in the spool an LRS's Retry-After is honoured in full (:func:`spool_delay`).
A held batch (not sent) waits out the hold, and its attempt numbers stay.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from celery import Celery

from . import bookkeeping, events
from .delivery import Answer, iso, retry_delay
from .metrics import Metrics
from .names import RETRIED, SPOOLED
from .settings import TASK_NAME, Settings
from .settle import Retry, keys
from .spool import Entry, Spool, SpoolError, SpoolFull

log = logging.getLogger("xapi_worker")


def spool_delay(settings: Settings, attempt: int, answer: Answer) -> float:
    """The wait before a spooled statement's next attempt: the live backoff, and an
    LRS's Retry-After honoured in full, however long (the spool is not bound by the
    visibility timeout as a countdown message is)."""
    s = settings
    delay = retry_delay(attempt, s.retry_base_seconds, s.retry_max_seconds, answer.retry_after)
    if answer.retry_after is not None:
        delay = max(delay, answer.retry_after)
    return delay


class Republish:
    """Live, spool off: re-published to the task queue with a countdown."""

    def __init__(
        self, app: Celery, settings: Settings, key: bytes, metrics: Metrics, node: Callable[[], str]
    ) -> None:
        self.app = app
        self.settings = settings
        self.key = key  # of the bookkeeping headers' signature
        self.metrics = metrics
        self.node = node

    def keep(self, retry: Retry) -> list[str]:
        s = self.settings
        answer, hold, attempt, step = retry.answer, retry.hold, retry.attempt, retry.step
        what = answer.what
        requeue: list[str] = []
        republished = 0
        if hold > 0:
            delay = round(min(hold, s.retry_max_seconds), 3)
        else:
            # One delay for the whole group, so the statements come back together.
            delay = retry_delay(
                attempt, s.retry_base_seconds, s.retry_max_seconds, answer.retry_after
            )
        for item in retry.items:
            task_id = str(uuid.uuid4())
            try:
                self.app.send_task(
                    TASK_NAME,
                    args=[item.statement],
                    countdown=delay,
                    task_id=task_id,
                    # signed by the transport as it is queued, over its eta and body: the
                    # next worker trusts these counts (bookkeeping.py)
                    headers=bookkeeping.unsigned_headers(
                        item.attempt + step, iso(item.first_seen), item.lone_failures
                    ),
                )
            except Exception:
                log.exception("cannot re-publish task %s: put back", item.key)
                requeue.extend(keys(item))
                continue
            republished += 1
        self.metrics.count(RETRIED, republished)
        if republished:
            events.emit(
                "retry",
                logging.WARNING,
                count=republished,
                reason=what,
                lrs_status=answer.status,
                delay_s=delay,
                attempt=attempt + step,
                held=hold > 0,
                node=self.node(),
            )
        if republished and hold <= 0:
            log.warning(
                "retry: %d statements re-published for attempt %d in %.1f s: %s",
                republished,
                attempt + 1,
                delay,
                what,
            )
        return requeue


class ToSpool:
    """Live, spool on: committed to the node's spool. A spool that cannot take them (full,
    disk full) leaves their messages in the broker."""

    def __init__(
        self, spool: Spool, settings: Settings, metrics: Metrics, node: Callable[[], str]
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.metrics = metrics
        self.node = node
        self._warned = -1e9  # monotonic: the last "put back" error of a full spool

    def keep(self, retry: Retry) -> list[str]:
        answer, hold, attempt, step = retry.answer, retry.hold, retry.attempt, retry.step
        delay = hold if hold > 0 else spool_delay(self.settings, attempt, answer)
        entries = [
            Entry(
                statement=item.statement,
                task_id=item.key,
                attempts=item.attempt + step,
                first_seen=item.first_seen,
                next_at=retry.now + delay,
                last_error=answer.what,
                lone_failures=item.lone_failures,
            )
            for item in retry.items
        ]
        try:
            self.spool.add(entries)
        except SpoolError as exc:
            now_m = time.monotonic()
            if now_m - self._warned >= 60 or not isinstance(exc, SpoolFull):
                self._warned = now_m
                log.error("%s: their messages are put back on the broker", exc)
            return [key for item in retry.items for key in keys(item)]
        if entries:
            self.metrics.count(SPOOLED, len(entries))
            events.emit(
                "spooled",
                logging.WARNING,
                count=len(entries),
                reason=answer.what,
                lrs_status=answer.status,
                delay_s=round(delay, 3),
                attempt=attempt + step,
                held=hold > 0,
                node=self.node(),
            )
            if hold <= 0:
                log.warning(
                    "spooled %d statements for attempt %d in %.1f s: %s",
                    len(entries),
                    attempt + step,
                    delay,
                    answer.what,
                )
        return []


class Reschedule:
    """The drainer: the spooled rows (keys: row ids) get the time of their next attempt;
    :attr:`rescheduled` collects their keys until the caller empties it."""

    def __init__(self, spool: Spool, settings: Settings) -> None:
        self.spool = spool
        self.settings = settings
        self.rescheduled: set[str] = set()

    def keep(self, retry: Retry) -> list[str]:
        later = [key for item in retry.items for key in keys(item)]
        if later:
            answer = retry.answer
            delay = (
                retry.hold if retry.hold > 0 else spool_delay(self.settings, retry.attempt, answer)
            )
            lone = {int(k): i.lone_failures for i in retry.items for k in keys(i)}
            self.spool.reschedule(
                [int(k) for k in later], retry.now + delay, answer.what, retry.step, lone
            )
            self.rescheduled.update(later)
        return []
