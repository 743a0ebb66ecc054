"""The Celery side: the app factory, the batch task that replaces
``pod.xapi.xapi_tasks.send_xapi_statement_task``, and what happens to each statement.

Acknowledgement: the batch task runs in a pool process; the worker's main process holds every
message of the batch unacknowledged and, when the pool returns, acknowledges the messages whose
statement was settled (delivered, dead-lettered or re-published for a later attempt) and puts
back the others. A pool process lost mid-batch (SIGKILL, OOM) puts the whole batch back. A
worker lost as a whole leaves its messages in Redis' ``unacked`` set, from which the next
consumer restores them once ``visibility_timeout`` has passed.
"""

from __future__ import annotations

import logging
import pickle
import socket
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

from celery import Celery
from celery.app.task import Task
from celery.signals import celeryd_init, worker_ready, worker_shutdown
from celery.worker.request import Request
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from . import bookkeeping, events
from .content import TOO_DEEP, printable, problem
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
    iso,
    merge_duplicates,
    parse_iso,
    retry_delay,
    unsendable,
)
from .lrs import LRSClient
from .metrics import DEAD_LETTERED, DELIVERED, RETRIED, SPOOLED, Metrics
from .settings import LAST_DELIVERY_KEY, QUEUE, TASK_NAME, Settings, mask_url
from .spool import Entry, Spool, SpoolError, SpoolFull
from .transport import ALIAS as TRANSPORT
from .transport import HEADER_KEY_OPTION, NODE_OPTION

log = logging.getLogger("xapi_worker")

#: Exit status of a worker whose spool cannot be opened (not damaged: a full disk, an I/O
#: error): EX_TEMPFAIL of sysexits.h, for systemd to start it again.
SPOOL_UNAVAILABLE_EXIT = 75
#: A lone failure counts against a statement when the LRS stored others this recently.
STORED_RECENTLY_SECONDS = 30.0
BROKER_SOCKET_TIMEOUT = 10.0
#: With the spool on and the LRS failing, a live batch probes it at least this often.
PROBE_MAX_SECONDS = 30.0
ROUTES = {"pod.xapi.xapi_tasks.*": {"queue": QUEUE}}


def make_celery(settings: Settings, name: str = "xapi_worker") -> Celery:
    """A Celery app configured for this broker, usable as worker and as producer."""
    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_routes=ROUTES,
        task_default_queue=QUEUE,
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=settings.effective_prefetch_multiplier,
        # Kombu's Redis transport with its BRPOP-then-HSET loss window closed (transport.py).
        broker_transport=TRANSPORT,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # A hung broker (SIGSTOP, a stalled network) fails a command after this long
            # instead of blocking the event loop for ever: Celery then reconnects. The poll
            # (BLMOVE, 1 s) is read only once readable, so it is not cut short.
            "socket_timeout": BROKER_SOCKET_TIMEOUT,
            "socket_connect_timeout": BROKER_SOCKET_TIMEOUT,
            # The key of the bookkeeping headers' signature (bookkeeping.py): the transport
            # signs a message's first take, the batch trusts only signed headers.
            HEADER_KEY_OPTION: bookkeeping.derive_key(
                settings.lrs_password, settings.broker_url
            ).hex(),
        },
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # A message the consumer cannot read is dead-lettered, never acknowledged into
        # nothing (consumer.py).
        worker_consumer="xapi_worker.consumer:Consumer",
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
        timezone="UTC",
    )
    celeryd_init.connect(_name_the_node(app), weak=False)
    return app


def _name_the_node(app: Celery) -> Callable[..., None]:
    """Give the transport the worker's node name (``-n xapi@%h``), stable across restarts,
    which names the node's in-flight list. Sent before the worker connects to the broker."""

    own_conf = app.conf

    def on_init(sender: str, conf: object = None, **_: object) -> None:
        if conf is not own_conf:  # another app's worker in this process
            return
        options = dict(app.conf.broker_transport_options or {})
        options[NODE_OPTION] = str(sender)
        app.conf.broker_transport_options = options

    return on_init


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
        self._disk_dead: DiskDeadLetters | None = None
        self._dead_warned = -1e9  # monotonic

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

    @property
    def dead_letters(self) -> DiskDeadLetters | None:
        """Where this node writes its dead letters: its spool file (deadstore.py); None
        without a spool (the broker's list, deadletters.RedisAccess)."""
        if self.spool is None:
            return None
        if self._disk_dead is None or self._disk_dead.spool is not self.spool:
            self._disk_dead = disk_dead_letters(self.spool, self.settings)
        return self._disk_dead

    def _write_dead_letter(self, letter: DeadLetter) -> bool:
        store = self.dead_letters
        try:
            if store is not None:
                store.add([letter.entry()])
            else:
                self.dead.add(letter)
        except SpoolFull as exc:
            # The node's dead letters (or its spool file) are full: kept where it is; the
            # drainer stops the node taking (drain.py) until they have room.
            now_m = time.monotonic()
            if now_m - self._dead_warned >= 60:
                self._dead_warned = now_m
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


def _slim(request: Request) -> SimpleRequest:
    """What the batch task reads of a request (id, arguments, the two headers of ours), and
    nothing more, for the pickle that crosses to the pool process. celery-batches'
    ``from_request`` also sends every header, and Celery's ``argsrepr`` header holds the
    whole statement a second time."""
    args, kwargs, _embed = request._payload
    headers = request.request_dict or {}
    ours = {k: headers[k] for k in bookkeeping.OURS if k in headers}
    return SimpleRequest(
        request.id, request.name, args, kwargs, None, request.hostname, True, None, None, ours
    )


class XapiBatches(Batches):  # type: ignore[misc]
    """celery-batches' task with acknowledgement decided per request by the task's result,
    and the batch put back when the pool process running it is lost."""

    abstract = True
    _tref: Any  # celery-batches' flush timer entry (None until started)

    def Strategy(self, task: Task, app: Celery, consumer: Any) -> Any:  # noqa: ANN401
        """Re-arm the flush timer on every consumer start (celery-batches #107, unfixed in
        0.11). Celery builds the strategy again after a lost broker connection, on a new
        consumer timer, but celery-batches keeps the old timer's entry in ``_tref`` and only
        starts a timer while ``_tref`` is None: after a reconnect the buffer was flushed only
        every ``flush_every`` messages, so a quiet queue's statements waited for traffic."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        handler = super().Strategy(task, app, consumer)
        if self._buffer.qsize():
            # Requests buffered before the reconnect: flush them on the new timer too.
            self._tref = consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)
        return handler

    #: Set by register_task: writes the dead letters of requests the pool cannot be given.
    processor: Processor | None = None

    def flush(self, requests: Collection[Request]) -> object:
        reqs = list(requests)
        try:
            return self._hand_over(reqs)
        except Exception:
            # Pickling the batch for the pool failed: a statement nested too deep (it was
            # decoded, it cannot be re-encoded a few calls deeper). Nothing was sent to the
            # pool; such statements are dead-lettered here, alone, and the rest handed over.
            log.warning("a batch of %d cannot go to the pool process: checking each", len(reqs))
            kept = [r for r in reqs if not self._unpoolable(r)]
            if not kept:
                return None
            try:
                return self._hand_over(kept)
            except Exception:
                log.exception("batch of %d not handed to the pool: messages put back", len(kept))
                for r in kept:
                    r.reject(requeue=True)
                return None

    def _unpoolable(self, request: Request) -> bool:
        """True when ``request`` cannot be handed to the pool and its dead letter is written
        (the message acknowledged); a message whose dead letter fails is put back."""
        args, kwargs, _embed = request._payload
        candidate = args[0] if len(args) == 1 and not kwargs else {"args": args, "kwargs": kwargs}
        why = problem(candidate)
        if why is None:
            try:
                pickle.dumps(_slim(request))
            except RecursionError:
                why = TOO_DEEP
            except Exception as exc:
                why = f"cannot be handed to the pool process: {type(exc).__name__}"
        if why is None:
            return False
        if self.processor is None:
            return False
        attempt, first_seen, _ = _bookkeeping(
            header_key(self.app), str(request.id), request.request_dict or {}, time.time()
        )
        letter = DeadLetter(
            statement=candidate if isinstance(candidate, dict) else {"value": candidate},
            reason=why,
            task_id=str(request.id),
            attempts=attempt,
            first_seen=first_seen,
        )
        written = self.processor._write_dead_letter(letter)
        self.processor.metrics.flush()
        if written:
            log.warning("dead letter: task %s: %s", request.id, why)
            request.acknowledge()
        else:
            request.reject(requeue=True)
        return True

    def _hand_over(self, reqs: list[Request]) -> object:
        payload = ([_slim(r) for r in reqs],)

        def on_return(result: object) -> None:
            if isinstance(result, dict):
                requeue = set(result.get("requeue", ()))
            else:  # the task raised: nothing was settled
                requeue = {r.id for r in reqs}
            for r in reqs:
                if r.id in requeue:
                    r.reject(requeue=True)
                else:
                    r.acknowledge()

        def on_error(exc: BaseException) -> None:
            log.error("batch of %d lost (%r): messages put back", len(reqs), exc)
            for r in reqs:
                r.reject(requeue=True)

        return self._pool.apply_async(
            apply_batches_task,
            (self, payload, 0, None),
            callback=on_return,
            error_callback=on_error,
        )


def register_task(app: Celery, settings: Settings) -> Task:
    processor = Processor(app, settings)
    _run_the_spool(app, processor)

    @app.task(  # type: ignore[untyped-decorator]
        base=XapiBatches,
        name=TASK_NAME,
        bind=True,
        flush_every=settings.batch_size,
        flush_interval=settings.flush_interval_ms / 1000,
        acks_late=True,
        ignore_result=True,
    )
    def send_xapi_statement_task(
        self: XapiBatches, requests: list[SimpleRequest]
    ) -> dict[str, list[str]]:
        return processor.process(requests)

    task: Task = send_xapi_statement_task
    task.processor = processor
    return task


def _run_the_spool(app: Celery, processor: Processor) -> None:
    """Open and check the node's spool in the main process as the worker starts (before the
    pool is forked: the pool processes inherit it), then start the drainer thread once the
    worker is ready; stop it at shutdown."""
    from .drain import Drainer  # the drainer needs this module's Processor

    own_conf = app.conf
    state: dict[str, Drainer] = {}

    def on_init(sender: str, conf: object = None, **_: object) -> None:
        if conf is not own_conf:
            return
        node = str(sender)
        if processor.settings.spool_enabled:
            s = processor.settings
            spool = Spool(s.spool_dir, node, s.spool_max_mb * 1024**2, s.batch_size)
            try:
                spool.open()
            except Exception as exc:
                # A full disk, an I/O error: the spool is not damaged, and this node must not
                # run without it (no retries kept, no drain): it stops, loudly, and systemd
                # starts it again (Restart=); nothing is taken from the broker meanwhile.
                log.critical(
                    "%s: this node stops without taking anything (exit %d); free the disk "
                    "or repair the directory, then it starts again",
                    exc,
                    SPOOL_UNAVAILABLE_EXIT,
                )
                raise SystemExit(SPOOL_UNAVAILABLE_EXIT) from exc
            log.info(
                "spool %s: %d statements, limit %d MiB",
                spool.path,
                spool.stats().depth,
                spool.max_bytes // 1024**2,
            )
            spool.close()  # reopened by each process that uses it
            processor.spool = spool
        state["drainer"] = Drainer(app, processor.settings, processor.spool, node)

    def on_ready(sender: object = None, **_: object) -> None:
        drainer = state.get("drainer")
        if drainer is not None and getattr(sender, "app", app) is app:
            drainer.start()

    def on_shutdown(**_: object) -> None:
        drainer = state.get("drainer")
        if drainer is not None:
            drainer.stop()

    celeryd_init.connect(on_init, weak=False)
    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
