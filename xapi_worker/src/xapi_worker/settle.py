"""Settling a batch: what each statement's result (``delivery.Result``) becomes.

- Delivered, or already stored with the same content: counted; its message is acknowledged.
- Refused for good: its dead letter is written (:meth:`Settler.write_dead_letter`, the one
  path of every dead letter the worker writes), then its message is acknowledged.
- To be tried again: dead-lettered instead when it is too old (:func:`too_old`, the one
  place of that rule); otherwise handed to the :class:`Retries` the caller gave, which knows
  where a retry goes (retries.py): a live batch re-publishes it with a countdown or spools it,
  the drainer reschedules its spooled row.

:meth:`Settler.settle` returns the keys (task ids; spool row ids for the drainer) whose fate
could not be recorded: their messages go back to the broker, their rows stay as they were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from . import events
from .content import bounded, printable
from .deadletters import DeadLetter, RedisAccess
from .deadstore import DiskDeadLetters
from .delivery import Answer, Item, Kind, Result, Verdict
from .metrics import Metrics
from .names import DEAD_LETTERED, DELIVERED
from .settings import Settings
from .spool import SpoolFull
from .urls import mask_url

log = logging.getLogger("xapi_worker")

#: The least time between two "dead letters full" messages of one settler (seconds).
FULL_WARN_SECONDS = 60.0


def keys(item: Item) -> list[str]:
    """The keys ``item`` settles: its own and its duplicates' (delivery.merge_duplicates)."""
    return [item.key] + [f.key for f in item.followers]


def too_old(item: Item, answer: Answer, now: float, settings: Settings) -> str | None:
    """Why ``item`` is dead-lettered rather than tried again: first seen more than
    ``XAPI_WORKER_MAX_AGE_DAYS`` before ``now``. None: young enough, or kept however old
    because the LRS refused the credentials or the request (the operator's to fix)."""
    if answer.kind in (Kind.AUTH, Kind.CONFIG):
        return None
    if now - item.first_seen > settings.max_age_days * 86400:
        return f"max age exceeded ({settings.max_age_days:g} days), last error: {answer.what}"
    return None


@dataclass(frozen=True)
class Retry:
    """Statements of a batch to try again, after one answer (or none: held) of the LRS."""

    items: list[Item]  # young enough to be tried again (too_old)
    answer: Answer
    now: float  # when the batch was read (epoch seconds)
    hold: float  # > 0: the batch was held, not sent; seconds the hold still lasts
    attempt: int  # the highest attempt number of the group, too old ones included

    @property
    def step(self) -> int:
        """What the attempt numbers grow by: a held batch was not sent, its numbers stay."""
        return 0 if self.hold > 0 else 1


class Retries(Protocol):
    """Where a retry goes (retries.py)."""

    def keep(self, retry: Retry) -> list[str]:
        """Keep ``retry.items`` for a later attempt; returns the keys of those it could not
        keep (their messages go back, their rows stay as they were)."""
        ...


class Settler:
    """Settles the results of a batch (see the module's docstring). ``node`` names the
    worker's node for the events; ``hold_for`` is told of an LRS's Retry-After longer than
    a countdown may be (no POST before it has passed)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        dead: RedisAccess,
        node: Callable[[], str],
        retries: Retries,
        hold_for: Callable[[float], None],
        disk: Callable[[], DiskDeadLetters | None] = lambda: None,
        rows: Callable[[Item], Sequence[int]] = lambda _item: (),
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.dead = dead
        self.node = node
        self.retries = retries
        self.hold_for = hold_for
        self.disk = disk  # the node's dead letters on its disk (None: the broker's list)
        # The spooled rows an item's dead letter settles (the drainer: its keys are row ids),
        # deleted with its writing; none for a live batch.
        self.rows = rows
        self._full_warned = -1e9  # monotonic time of the last "dead letters full" message

    def write_dead_letter(self, letter: DeadLetter, settles: Sequence[int] = ()) -> bool:
        """Write ``letter`` (to the node's disk, :attr:`disk`, when its spool is on; to the
        broker's list otherwise), count it, say so (event ``dead_letter``); False, logged,
        when it cannot be written: its message then goes back. ``settles``: the spooled rows
        it settles (the drainer's), deleted with its writing (deadstore.DiskDeadLetters.add);
        when none of them was left (settled meanwhile by another process), nothing is
        written, nothing counted. A statement larger than the worker takes is kept as its
        summary (content.bounded): a dead letter weighs no more than a statement taken."""
        statement = bounded(letter.statement, self.settings.max_statement_bytes)
        if statement is not letter.statement:
            letter = replace(letter, statement=statement)
        disk = self.disk()
        try:
            if disk is not None:
                if not disk.add([letter.entry()], settles=settles):
                    log.info("task %s settled meanwhile by another process", letter.task_id)
                    return True
            else:
                self.dead.add(letter)
        except SpoolFull as exc:
            # The node's dead letters (or its spool file) are full: kept where it is; the
            # drainer stops the node taking (drain.py) until they have room. Said once a
            # minute at most.
            now_m = time.monotonic()
            if now_m - self._full_warned >= FULL_WARN_SECONDS:
                self._full_warned = now_m
                log.critical("%s: task %s put back", exc, letter.task_id)
            return False
        except Exception:
            log.exception("cannot write dead letter for task %s: put back", letter.task_id)
            return False
        self.metrics.count(DEAD_LETTERED)
        statement_id = letter.statement.get("id")
        events.emit(
            "dead_letter",
            logging.WARNING,
            statement_id=statement_id if isinstance(statement_id, str) else None,
            task_id=letter.task_id,
            reason=letter.reason[:300],
            lrs_status=letter.status,
            attempts=letter.attempts,
            node=self.node(),
        )
        return True

    def settle(
        self, results: list[Result], now: float, hold: float = 0.0, batch: int = 0
    ) -> list[str]:
        """Settle ``results`` (of a batch of ``batch`` statements, read at ``now``; held
        ``hold`` seconds more when it was not sent); returns the keys not settled."""
        requeue: list[str] = []
        retry_groups: dict[tuple[object, ...], list[Result]] = {}
        for res in results:
            if res.verdict is Verdict.DELIVERED:
                self.metrics.count(DELIVERED)
            elif res.verdict is Verdict.DUPLICATE:
                log.info(
                    "statement %s already stored with the same content (%s): delivered",
                    printable(res.item.statement_id),
                    res.answer.what,
                )
                self.metrics.count(DELIVERED)
                events.emit(
                    "delivered",
                    count=1,
                    lrs_status=res.answer.status,
                    latency_ms=round(res.answer.latency_ms),
                    node=self.node(),
                    batch=batch,
                    already_stored=True,
                    statement_id=res.item.statement_id,
                )
            elif res.verdict is Verdict.DEAD:
                if not self.dead_letter(res.item, res.reason or res.answer.what, res):
                    requeue.extend(keys(res.item))
            elif res.verdict is Verdict.RETRY:
                retry_groups.setdefault(res.answer.group_key, []).append(res)
        for group in retry_groups.values():
            requeue.extend(self.retry([r.item for r in group], group[0].answer, now, hold))
        return requeue

    def dead_letter(self, item: Item, reason: str, res: Result) -> bool:
        answer = res.answer
        letter = DeadLetter(
            statement=item.statement,
            reason=reason,
            status=answer.status,
            response=answer.excerpt or answer.error,
            task_id=item.key,
            attempts=item.attempt,
            first_seen=item.first_seen,
            conflict=res.conflict,
        )
        if not self.write_dead_letter(letter, self.rows(item)):
            return False
        log.warning(
            "dead letter: statement %s (task %s, attempt %d): %s: %s",
            printable(item.statement_id),
            item.key,
            item.attempt,
            reason,
            (answer.excerpt or answer.error)[:200].replace("\n", " "),
        )
        return True

    def retry(self, group: list[Item], answer: Answer, now: float, hold: float) -> list[str]:
        """A group of statements with the same answer, to try again: the too old ones are
        dead-lettered, the others go where :attr:`retries` keeps them."""
        s = self.settings
        kind = answer.kind
        if kind is Kind.AUTH:
            log.error(
                "LRS %s refused the credentials (HTTP %s): check XAPI_LRS_LOGIN/XAPI_LRS_PWD; "
                "%d statements kept for a later attempt",
                mask_url(s.lrs_url),
                answer.status,
                len(group),
            )
        elif kind is Kind.CONFIG:
            log.error(
                "LRS answered HTTP %s for %s: the request itself is refused (check "
                "XAPI_LRS_URL, a proxy, the LRS version): %d statements kept for a later attempt",
                answer.status,
                mask_url(s.lrs_url),
                len(group),
            )
        if answer.retry_after is not None and answer.retry_after > s.retry_max_seconds:
            # Honoured in full: the retries come back within the visibility timeout (one
            # maximum delay) and are held, unsent, until the LRS's time has come.
            self.hold_for(answer.retry_after)
            log.warning(
                "LRS asked to wait %.0f s (Retry-After): nothing is sent before then",
                answer.retry_after,
            )
        requeue: list[str] = []
        young: list[Item] = []
        for item in group:
            reason = too_old(item, answer, now, s)
            if reason is None:
                young.append(item)
            elif not self.dead_letter(item, reason, Result(item, Verdict.DEAD, answer)):
                requeue.extend(keys(item))
        attempt = max(i.attempt for i in group)
        requeue.extend(self.retries.keep(Retry(young, answer, now, hold, attempt)))
        return requeue
