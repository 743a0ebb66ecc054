"""One batch of statements, as a pool process (live) or the drainer (the spool) runs it:
read from the task requests, delivered to the LRS (or held), and each statement settled.

The LRS's holds live here too: an LRS's long ``Retry-After``, and (spool on) the LRS failing
batch after batch, during which live batches go to the spool without a POST.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Collection
from typing import Any

from celery import Celery
from celery_batches import SimpleRequest

from . import bookkeeping, events
from .content import printable
from .deadletters import DeadLetter, RedisAccess
from .delivery import (
    Answer,
    Item,
    Kind,
    Result,
    Verdict,
    deliver,
    ensure_statement_id,
    iso,
    merge_duplicates,
    parse_iso,
    retry_delay,
    unsendable,
)
from .lrs import LRSClient
from .metrics import DEAD_LETTERED, DELIVERED, RETRIED, SPOOLED, Metrics
from .settings import LAST_DELIVERY_KEY, TASK_NAME, Settings, mask_url
from .spool import Entry, Spool, SpoolError, SpoolFull
from .transport import HEADER_KEY_OPTION, NODE_OPTION

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


def _bookkeeping(
    key: bytes, task_id: str, headers: dict[str, Any], now: float
) -> tuple[int, float, int]:
    """Attempt, first seen (epoch seconds) and lone failures of a message, as a worker signed
    them in its headers; those of a new message (1, ``now``, 0) when no worker did."""
    book = bookkeeping.trusted(key, task_id, headers)
    return book.attempt, parse_iso(book.first_seen) or now, book.lone_failures


class Processor:
    """Settles one batch of requests; returns the ids of the requests to put back."""

    def __init__(self, app: Celery, settings: Settings) -> None:
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
        # process at start (open_spool), before the pool processes are forked.
        self.spool: Spool | None = None
        self._failing = 0  # batches in a row the LRS took nothing of (spool on)
        self._spool_warned = -1e9  # monotonic

    def __repr__(self) -> str:
        return f"Processor({mask_url(self.settings.lrs_url)!r})"

    @property
    def node(self) -> str:
        """The worker's node name (``-n xapi@%h``), given to the transport at start-up."""
        options = self.app.conf.broker_transport_options or {}
        return str(options.get(NODE_OPTION) or socket.gethostname())

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
            attempt, first_seen, lone_failures = _bookkeeping(self.key, task_id, headers, now)
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
                if not self._write_dead_letter(letter):
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
            sendable, results = unsendable(leaders)
            results.extend(Result(i, Verdict.RETRY, answer) for i in sendable)
            return self._settle(results, now, hold=held)
        try:
            results = deliver(
                leaders,
                self.lrs.post_statements,
                on_sent=self._on_sent,
                fetch=self.lrs.get_statement,
                isolate_after=self.settings.isolate_after,
                stored_before=self._stored_recently,
                deadline=self._deadline(taken_at),
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
        return self._settle(results, now)

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

    def _settle(self, results: list[Result], now: float, hold: float = 0.0) -> list[str]:
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
                    node=self.node,
                    batch=self._batch,
                    already_stored=True,
                    statement_id=res.item.statement_id,
                )
            elif res.verdict is Verdict.DEAD:
                if not self._dead_letter(res.item, res.reason or res.answer.what, res):
                    requeue.extend(self._keys(res.item))
            elif res.verdict is Verdict.RETRY:
                retry_groups.setdefault(res.answer.group_key, []).append(res)
        for group in retry_groups.values():
            requeue.extend(self._retry([r.item for r in group], group[0].answer, now, hold))
        return requeue

    @staticmethod
    def _keys(item: Item) -> list[str]:
        return [item.key] + [f.key for f in item.followers]

    def _write_dead_letter(self, letter: DeadLetter) -> bool:
        try:
            self.dead.add(letter)
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
            node=self.node,
        )
        return True

    def _dead_letter(self, item: Item, reason: str, res: Result) -> bool:
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
        if not self._write_dead_letter(letter):
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

    def _retry(self, group: list[Item], answer: Answer, now: float, hold: float) -> list[str]:
        s = self.settings
        kind = answer.kind
        what = answer.what
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
            # maximum delay) and are held here, unsent, until the LRS's time has come.
            self._held_until = time.monotonic() + answer.retry_after
            log.warning(
                "LRS asked to wait %.0f s (Retry-After): nothing is sent before then",
                answer.retry_after,
            )
        bounded = kind not in (Kind.AUTH, Kind.CONFIG)
        max_age = s.max_age_days * 86400
        if self.spool is not None:
            return self._to_spool(group, answer, now, hold, bounded, max_age)
        requeue: list[str] = []
        republished = 0
        # A held batch was not sent: its attempt number stays, so does its backoff.
        step = 0 if hold > 0 else 1
        attempt = max(i.attempt for i in group)
        if hold > 0:
            delay = round(min(hold, s.retry_max_seconds), 3)
        else:
            # One delay for the whole group, so the statements come back together.
            delay = retry_delay(
                attempt, s.retry_base_seconds, s.retry_max_seconds, answer.retry_after
            )
        for item in group:
            if bounded and now - item.first_seen > max_age:
                reason = f"max age exceeded ({s.max_age_days:g} days), last error: {what}"
                if not self._dead_letter(item, reason, Result(item, Verdict.DEAD, answer)):
                    requeue.extend(self._keys(item))
                continue
            task_id = str(uuid.uuid4())
            try:
                self.app.send_task(
                    TASK_NAME,
                    args=[item.statement],
                    countdown=delay,
                    task_id=task_id,
                    # signed: the next worker trusts these counts (bookkeeping.py)
                    headers=bookkeeping.signed_headers(
                        self.key,
                        task_id,
                        item.attempt + step,
                        iso(item.first_seen),
                        item.lone_failures,
                    ),
                )
            except Exception:
                log.exception("cannot re-publish task %s: put back", item.key)
                requeue.extend(self._keys(item))
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
                node=self.node,
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

    def _delay(self, attempt: int, answer: Answer) -> float:
        """The wait before a spooled statement's next attempt: the live backoff, and an
        LRS's Retry-After honoured in full, however long (the spool is not bound by the
        visibility timeout as a countdown message is)."""
        s = self.settings
        delay = retry_delay(attempt, s.retry_base_seconds, s.retry_max_seconds, answer.retry_after)
        if answer.retry_after is not None:
            delay = max(delay, answer.retry_after)
        return delay

    def _to_spool(
        self,
        group: list[Item],
        answer: Answer,
        now: float,
        hold: float,
        bounded: bool,
        max_age: float,
    ) -> list[str]:
        """Retries live in the spool: the statements are committed to disk, then their
        messages are acknowledged. A spool that cannot take them (full, disk full) leaves
        the messages in the broker."""
        s = self.settings
        assert self.spool is not None
        requeue: list[str] = []
        step = 0 if hold > 0 else 1
        attempt = max(i.attempt for i in group)
        delay = hold if hold > 0 else self._delay(attempt, answer)
        entries: list[Entry] = []
        spooled: list[Item] = []
        for item in group:
            if bounded and now - item.first_seen > max_age:
                reason = f"max age exceeded ({s.max_age_days:g} days), last error: {answer.what}"
                if not self._dead_letter(item, reason, Result(item, Verdict.DEAD, answer)):
                    requeue.extend(self._keys(item))
                continue
            entries.append(
                Entry(
                    statement=item.statement,
                    task_id=item.key,
                    attempts=item.attempt + step,
                    first_seen=item.first_seen,
                    next_at=now + delay,
                    last_error=answer.what,
                    lone_failures=item.lone_failures,
                )
            )
            spooled.append(item)
        try:
            self.spool.add(entries)
        except SpoolError as exc:
            now_m = time.monotonic()
            if now_m - self._spool_warned >= 60 or not isinstance(exc, SpoolFull):
                self._spool_warned = now_m
                log.error("%s: their messages are put back on the broker", exc)
            for item in spooled:
                requeue.extend(self._keys(item))
            return requeue
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
                node=self.node,
            )
            if hold <= 0:
                log.warning(
                    "spooled %d statements for attempt %d in %.1f s: %s",
                    len(entries),
                    attempt + step,
                    delay,
                    answer.what,
                )
        return requeue
