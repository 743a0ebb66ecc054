"""The Celery side: the app factory, the batch task that replaces
``pod.xapi.xapi_tasks.send_xapi_statement_task``, and the signal handlers that open the
node's spool and run its drainer (drain.py). A batch is run by ``batch.Processor``; what
happens to each statement is settle.py's.

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
import time
from collections.abc import Callable, Collection
from typing import Any

from celery import Celery
from celery.app.task import Task
from celery.signals import celeryd_init, worker_ready, worker_shutdown
from celery.worker.request import Request
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from . import bookkeeping
from .batch import Processor, header_key, read_bookkeeping
from .content import TOO_DEEP, problem
from .deadletters import DeadLetter
from .drain import Drainer
from .names import QUEUE
from .settings import TASK_NAME, Settings
from .spool import Spool
from .transport import ALIAS as TRANSPORT
from .transport import DEAD_LETTERS_OPTION, HEADER_KEY_OPTION, NODE_OPTION

log = logging.getLogger("xapi_worker")

#: Exit status of a worker whose spool cannot be opened (not damaged: a full disk, an I/O
#: error): EX_TEMPFAIL of sysexits.h, for systemd to start it again.
SPOOL_UNAVAILABLE_EXIT = 75
BROKER_SOCKET_TIMEOUT = 10.0
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
            # Where a gone node's claimed dead letters go back (transport.recover_orphans).
            DEAD_LETTERS_OPTION: settings.dead_letter_key,
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
        limit = self.processor.settings.max_statement_bytes if self.processor else None
        why = problem(candidate) if limit is None else problem(candidate, limit)
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
        attempt, first_seen, _ = read_bookkeeping(
            header_key(self.app), str(request.id), request.request_dict or {}, time.time()
        )
        letter = DeadLetter(
            statement=candidate if isinstance(candidate, dict) else {"value": candidate},
            reason=why,
            task_id=str(request.id),
            attempts=attempt,
            first_seen=first_seen,
        )
        written = self.processor.write_dead_letter(letter)
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
    own_conf = app.conf
    state: dict[str, Drainer] = {}

    def on_init(sender: str, conf: object = None, **_: object) -> None:
        if conf is not own_conf:
            return
        node = str(sender)
        if processor.settings.spool_enabled:
            s = processor.settings
            spool = Spool(
                s.spool_dir, node, s.spool_max_mb * 1024**2, s.batch_size, s.max_statement_bytes
            )
            try:
                spool.open(exclusive=True)  # the node's own: no other holder
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
            # reopened by each process that uses it; its lock held for the node's life
            spool.close(keep_lock=True)
            processor.use_spool(spool)
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
