"""One batch of statements, as a pool process (live) or the drainer (the spool) runs it:
read from the task requests, delivered to the LRS (or held), and each statement settled.

The LRS's holds live here too: an LRS's long ``Retry-After``, and (spool on) the LRS failing
batch after batch, during which live batches go to the spool without a POST.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Collection
from functools import partial
from typing import Any

from celery import Celery
from celery_batches import SimpleRequest

from . import bookkeeping, events
from .deadletters import DeadLetter, RedisAccess
from .deadstore import DiskDeadLetters, disk_dead_letters
from .delivery import (
    Answer,
    Item,
    Kind,
    Result,
    Verdict,
    deliver,
    ensure_statement_id,
    merge_duplicates,
    parse_iso,
    unsendable,
)
from .lrs import LRSClient
from .metrics import Metrics
from .names import LAST_DELIVERY as LAST_DELIVERY_KEY
from .retries import Republish, ToSpool
from .settings import Settings
from .settle import Retries, Settler
from .spool import Spool
from .transport import HEADER_KEY_OPTION, NODE_OPTION
from .urls import mask_url

log = logging.getLogger("xapi_worker")

#: A lone failure counts against a statement when the LRS stored others this recently.
STORED_RECENTLY_SECONDS = 30.0
#: With the spool on and the LRS failing, a live batch probes it at least this often.
PROBE_MAX_SECONDS = 30.0


def _statement_of(req: SimpleRequest) -> dict[str, Any] | None:
    args = tuple(req.args or ())
    kwargs = dict(req.kwargs or {})
    if len(args) == 1 and not kwargs and isinstance(args[0], dict):
        return args[0]
    if not args and set(kwargs) == {"statement"} and isinstance(kwargs["statement"], dict):
        return dict(kwargs["statement"])
    return None


def header_key(app: Celery) -> bytes:
    """The key of the bookkeeping headers' signature, derived once by make_celery."""
    options = app.conf.broker_transport_options or {}
    return bytes.fromhex(str(options.get(HEADER_KEY_OPTION) or ""))


def node_name(app: Celery) -> str:
    """The worker's node name (``-n xapi@%h``), given to the transport at start-up."""
    options = app.conf.broker_transport_options or {}
    return str(options.get(NODE_OPTION) or socket.gethostname())


def read_bookkeeping(
    key: bytes, task_id: str, headers: dict[str, Any], now: float
) -> tuple[int, float, int]:
    """Attempt, first seen (epoch seconds) and lone failures of a message, as a worker signed
    them in its headers; those of a new message (1, ``now``, 0) when no worker did."""
    book = bookkeeping.trusted(key, task_id, headers)
    return book.attempt, parse_iso(book.first_seen) or now, book.lone_failures


class Processor:
    """Runs one batch: reads its requests, delivers (or holds) its statements and settles
    each (settle.Settler, retries going where ``retries`` keeps them: by default the queue,
    or the spool once :meth:`use_spool` gave it); returns the keys to put back."""

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        spool: Spool | None = None,
        retries: Retries | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.lrs = LRSClient(settings)
        self.dead = RedisAccess(settings)
        self.metrics = Metrics(settings)
        self.key = header_key(app)
        self._held_until = 0.0  # monotonic: no POST before (an LRS's long Retry-After)
        self._stored_at = -1e9  # monotonic: the last batch the LRS stored statements of
        self._batch = 0  # statements of the batch being processed (for the events)
        # The node's durable spool (None: off), opened and checked by the worker's main
        # process at start (use_spool), before the pool processes are forked.
        self.spool = spool
        self._failing = 0  # batches in a row the LRS took nothing of (spool on)
        self._disk_dead: DiskDeadLetters | None = None
        self.settler = Settler(
            settings,
            self.metrics,
            self.dead,
            partial(node_name, app),
            retries or self._live_retries(),
            self._hold_for,
            lambda: self.dead_letters,
        )

    def __repr__(self) -> str:
        return f"Processor({mask_url(self.settings.lrs_url)!r})"

    def use_spool(self, spool: Spool) -> None:
        """The node's spool, opened and checked by the worker's main process at start,
        before the pool processes are forked: live retries go there from now on."""
        self.spool = spool
        self.settler.retries = self._live_retries()

    def _live_retries(self) -> Retries:
        """Where a live batch's retries go: the spool when it is on, the queue otherwise."""
        node = partial(node_name, self.app)
        if self.spool is not None:
            return ToSpool(self.spool, self.settings, self.metrics, node)
        return Republish(self.app, self.settings, self.key, self.metrics, node)

    @property
    def dead_letters(self) -> DiskDeadLetters | None:
        """Where this node writes its dead letters: its spool file (deadstore.py); None
        without a spool (the broker's list, deadletters.RedisAccess)."""
        if self.spool is None:
            return None
        if self._disk_dead is None or self._disk_dead.spool is not self.spool:
            self._disk_dead = disk_dead_letters(self.spool, self.settings)
        return self._disk_dead

    def write_dead_letter(self, letter: DeadLetter) -> bool:
        """Write the dead letter of a message that cannot be delivered (settle.py)."""
        return self.settler.write_dead_letter(letter)

    @property
    def node(self) -> str:
        return node_name(self.app)

    # --- logging of each HTTP exchange -------------------------------------------------------
    def _on_sent(self, count: int, answer: Answer) -> None:
        self.metrics.observe_post(count, answer.status, answer.latency_ms / 1000)
        kind = answer.kind
        if kind is Kind.OK:
            log.info(
                "delivered batch: %d statements, HTTP %s, %.0f ms",
                count,
                answer.status,
                answer.latency_ms,
            )
            events.emit(
                "delivered",
                count=count,
                lrs_status=answer.status,
                latency_ms=round(answer.latency_ms),
                node=self.node,
                batch=self._batch,
            )
        elif kind is Kind.REJECTED and count > 1:
            log.info(
                "LRS rejected a batch of %d statements (HTTP %s, %.0f ms): splitting it",
                count,
                answer.status,
                answer.latency_ms,
            )

    # --- the batch ----------------------------------------------------------------------------
    def process(self, requests: Collection[SimpleRequest]) -> dict[str, list[str]]:
        self._batch = len(requests)
        try:
            return self._process(requests)
        finally:
            # One pipeline per batch, best effort: never raises, never puts a message back.
            self.metrics.flush()

    def _process(self, requests: Collection[SimpleRequest]) -> dict[str, list[str]]:
        now = time.time()
        requeue: list[str] = []
        items: list[Item] = []
        taken: list[float] = []
        for req in requests:
            task_id = str(req.id)
            statement = _statement_of(req)
            headers = req.request_dict or {}
            # Attempt, lone failures and first seen (stamped by the first take from the
            # broker, transport.py, kept by every retry) only as a worker signed them: any
            # producer can set any header (bookkeeping.py).
            attempt, first_seen, lone_failures = read_bookkeeping(self.key, task_id, headers, now)
            when = bookkeeping.taken_at(headers)
            if when is not None:
                taken.append(when)
            if statement is None:
                log.warning("dead letter: task %s carries no statement dict", task_id)
                letter = DeadLetter(
                    statement={"args": list(req.args or ()), "kwargs": dict(req.kwargs or {})},
                    reason="malformed task: expected one positional statement dict",
                    task_id=task_id,
                    attempts=attempt,
                    first_seen=first_seen,
                )
                if not self.write_dead_letter(letter):
                    requeue.append(task_id)
                continue
            ensure_statement_id(statement, task_id)
            items.append(Item(task_id, statement, attempt, first_seen, lone_failures))
        taken_at = min(taken) if taken else None
        requeue.extend(self.run(merge_duplicates(items), now, taken_at=taken_at))
        return {"requeue": requeue}

    def run(self, leaders: list[Item], now: float, taken_at: float | None = None) -> list[str]:
        """Deliver ``leaders`` (or hold them) and settle each; returns the keys not settled.
        ``taken_at``: when the earliest of their messages was taken from the broker (epoch
        seconds), from which the broker's visibility timeout counts; None: now."""
        held = self._held_until - time.monotonic()
        if leaders and held > 0:
            # The LRS asked (Retry-After) not to be called before then, or keeps failing
            # (spool on): nothing is sent.
            answer = Answer(status=None, error=f"held: no POST to the LRS for {held:.0f} s more")
            sendable, results = unsendable(leaders, self.settings.max_statement_bytes)
            results.extend(Result(i, Verdict.RETRY, answer) for i in sendable)
            return self.settler.settle(results, now, hold=held, batch=self._batch)
        try:
            results = deliver(
                leaders,
                self.lrs.post_statements,
                on_sent=self._on_sent,
                fetch=self.lrs.get_statement,
                isolate_after=self.settings.isolate_after,
                stored_before=self._stored_recently,
                deadline=self._deadline(taken_at),
                max_statement_bytes=self.settings.max_statement_bytes,
            )
        except Exception as exc:  # a bug of ours: keep the statements, try again later
            log.exception("internal error while delivering a batch")
            answer = Answer(status=None, error=f"internal error: {type(exc).__name__}")
            results = [Result(i, Verdict.RETRY, answer) for i in leaders]
        if any(r.verdict in (Verdict.DELIVERED, Verdict.DUPLICATE) for r in results):
            # One SET per batch the LRS accepted (the monitoring's last_delivery_age).
            self._stored_at = time.monotonic()
            self.dead.note_delivery()
            self._answering()
        elif results and all(r.verdict is Verdict.RETRY for r in results):
            self._not_answering(results[0].answer)
        return self.settler.settle(results, now, batch=self._batch)

    def _split_budget(self, from_take: bool = True) -> float:
        """Seconds a batch's exchange (a split included) may last from the take of its
        messages: they come back to another consumer after the visibility timeout, of which
        a flush and the last POST (which may start just before the deadline) take their
        share. Counted from the take, the time a retry waited for its countdown is spent
        already; counted from now (``from_take`` False: the take unknown), a retry delay
        is kept aside too."""
        s = self.settings
        exchange = s.connect_timeout + s.read_timeout
        budget = s.visibility_timeout - s.flush_interval_ms / 1000 - 2 * exchange
        if not from_take:
            budget -= s.retry_max_seconds
        return max(budget, exchange)

    def _deadline(self, taken_at: float | None) -> float:
        """The monotonic time after which no POST of this batch starts: the budget counts
        from when its messages were taken (the time they waited for their countdown, in the
        buffer and for the pool is spent already), not from now. The first POST is always
        sent (deliver())."""
        if taken_at is None:
            return time.monotonic() + self._split_budget(from_take=False)
        waited = max(0.0, time.time() - taken_at)
        return time.monotonic() + self._split_budget() - waited

    def _stored_recently(self) -> bool:
        """The LRS stored statements in the last STORED_RECENTLY_SECONDS: a batch of this
        process, or of any process of any node (``xapi.last_delivery``, one GET, asked only
        when a statement fails alone). Best effort: False when the broker cannot say."""
        if time.monotonic() - self._stored_at < STORED_RECENTLY_SECONDS:
            return True
        try:
            raw: bytes | None = self.dead.quick_client.get(LAST_DELIVERY_KEY)  # type: ignore[assignment]
            return raw is not None and time.time() - float(raw) < STORED_RECENTLY_SECONDS
        except Exception:
            log.debug("%s not read", LAST_DELIVERY_KEY, exc_info=True)
            return False

    def _hold_for(self, seconds: float) -> None:
        """No POST to the LRS for ``seconds`` (its Retry-After)."""
        self._held_until = time.monotonic() + seconds

    # --- the LRS failing: live batches to the spool without a POST ------------------------------
    def _not_answering(self, answer: Answer) -> None:
        """Past XAPI_WORKER_SPOOL_AFTER failing batches in a row, the LRS is not called for
        live batches until a probe is due: they go to the spool at once, so the broker is
        emptied at the pace of the disk, not of the LRS's timeouts."""
        if self.spool is None:
            return
        self._failing += 1
        over = self._failing - self.settings.spool_after
        if over < 0:
            return
        probe = min(PROBE_MAX_SECONDS, self.settings.retry_base_seconds * 2**over)
        self._held_until = max(self._held_until, time.monotonic() + probe)
        if over == 0:
            log.warning(
                "LRS failing for %d batches in a row (%s): live statements go to the spool "
                "without a POST; one batch probes the LRS every %.0f s at most",
                self._failing,
                answer.what,
                PROBE_MAX_SECONDS,
            )

    def _answering(self) -> None:
        if self.spool is None or not self._failing:
            return
        self._failing = 0
        self._held_until = 0.0
        try:
            woken = self.spool.wake()
        except Exception:
            log.exception("cannot mark spool %s due", self.spool.path)
            return
        if woken:
            log.info("LRS answers again: %d spooled statements are due now", woken)
