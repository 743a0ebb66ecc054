"""Kombu's Redis transport, with its one loss window closed.

Kombu (5.5) takes a message off the queue with ``BRPOP`` and only then, in a second round
trip, records it in the ``unacked`` hash. A worker killed between the two (SIGKILL, OOM, a
host reset, a warm shutdown with a ``BRPOP`` answer still unread: celery/celery#4354) loses
that message: it is in neither place. Here the message goes, in one atomic ``BLMOVE``, from
the queue to an in-flight list of this worker node (``xapi.inflight.<node>``); it leaves that
list in the same ``MULTI``/``EXEC`` that writes it to ``unacked``. So at every instant a
message is in the queue, in an in-flight list or in ``unacked``.

Throughput: when ``BLMOVE`` returns, the messages behind it (up to what the prefetch limit
leaves room for, at most ``TAKE_MAX``) are moved too, by one Lua script of ``LMOVE``s, and
all of them are recorded in ``unacked`` (and leave the in-flight list) in one ``MULTI``. The
acknowledgements Celery makes in one turn of its event loop go out in one pipeline. So a
batch of 100 costs a handful of round trips instead of three per message.

What is left in an in-flight list was never handed to a task (the task only ever sees
messages already in ``unacked``), so it is pushed back to the head of its queue, unchanged:

- by the same node when it starts consuming again (the node name, ``-n xapi@%h``, is stable
  across restarts of the systemd unit and of the host);
- by any other node, for a node whose heartbeat key (``<list>.alive``, refreshed while the
  node consumes, expiring after ``visibility_timeout``) is gone: a node removed for good.

Wire format, queue and producers are untouched: Pod's frontal keeps ``LPUSH``-ing to
``xapi``. Priorities: Pod sends none. A message sent with a priority lands on one of kombu's
priority lists (``xapi\\x06\\x16<n>``); this transport reads the plain queue only and moves
those lists onto it (at the back) when it starts and every few minutes, so none is stranded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any, ClassVar

import redis
from kombu.asynchronous import Hub
from kombu.message import Message
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from . import bookkeeping, names, watchdog
from .delivery import iso
from .names import ALIVE, DEAD_CLAIM, DEAD_LETTERS, inflight_key, registry_key, unreadable_key
from .scripts import Scripts, is_oom, move_all, push

log = logging.getLogger("xapi_worker.transport")

ALIAS = "xapi-redis"
#: Message header: when the message was first taken from the queue (ISO 8601, UTC), unless
#: an earlier attempt of a worker set it (signed: bookkeeping.py). The maximum age counts
#: from it.
FIRST_SEEN = bookkeeping.FIRST_SEEN
#: Transport option (``broker_transport_options``) naming the worker node; set by the app at
#: ``celeryd_init``, before the worker connects.
NODE_OPTION = "xapi_node"
#: Transport option: the key of the bookkeeping headers' signature (hex), set by the app.
HEADER_KEY_OPTION = "xapi_header_key"
#: Transport option: the broker's dead-letter list (``XAPI_WORKER_DEAD_LETTER_KEY``), where a
#: gone node's claimed dead letters go back (recover_orphans), set by the app.
DEAD_LETTERS_OPTION = "xapi_dead_letters"
#: Message header naming a compression of the body (kombu's): such a message is set aside.
COMPRESSION = "compression"
#: How often a consuming node refreshes its heartbeat key, at most (seconds).
HEARTBEAT_EVERY = 10.0
#: Kombu's priority lists that producers may have used (see the module docstring).
PRIORITY_LISTS = tuple(kombu_redis.PRIORITY_STEPS[1:])
#: Most acknowledgements in one script call (Lua's unpack has a stack limit).
ACK_CHUNK = 1000
#: Most messages taken in one go after a ``BLMOVE`` (bounded by the prefetch limit too).
TAKE_MAX = 500
#: After a take that emptied the queue, the next ``BLMOVE`` waits until this long after it.
#: Statements that arrive one by one (a live frontal) are then taken a few at a time: a take
#: costs the main process about the same whatever its size (docs/benchmarks.md), so this
#: divides the consumer's CPU per statement. Nothing is in flight during the wait (it comes
#: before the take), and it is far below the batch's flush interval (500 ms by default).
GATHER_SECONDS = 0.1


#: Cleared while this process must take nothing from the task queue (its node's spool is
#: full, drain.py): the node keeps its heartbeat and its messages, and polls no more.
TAKING = threading.Event()
TAKING.set()


def return_inflight(client: redis.Redis, key: str, queue: str) -> int:
    """Push an in-flight list back to the consuming end of its queue, oldest first out.

    ``BLMOVE`` put the newest on the left of the in-flight list; taking from the left and
    pushing on the right (where consumers pop) leaves the oldest next in line.
    """
    return move_all(client, key, queue, "LEFT", "RIGHT")


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    _ack_batch: list[str] | None = None

    def append(self, message: Message, delivery_tag: str) -> None:
        if self.channel.recorded.pop(delivery_tag, None) is None:
            # Not taken by Channel._hand_over (basic_get, a restore): kombu's way.
            super().append(message, delivery_tag)
            return
        VirtualQoS.append(self, message, delivery_tag)  # already in unacked

    def ack(self, delivery_tag: str) -> None:
        # Celery acknowledges through the event loop (hub.call_soon), a batch's worth in one
        # loop turn: those acknowledgements leave unacked together, one turn later.
        connection = self.channel.connection
        if connection is None:
            # The channel was closed since the take (the broker connection dropped, Celery
            # reconnected on a new one) and its close put back what it held: the message
            # comes again (a re-send, idempotent at the LRS), there is nothing left here to
            # remove. Raising would stop the worker (an unrecoverable error in the loop).
            log.info("acknowledgement of %s dropped: its channel is closed", delivery_tag)
            return
        hub = connection.hub
        if hub is None:  # no event loop (a plain consumer): kombu's way
            super().ack(delivery_tag)
            return
        if self._ack_batch is None:
            self._ack_batch = []
            hub.call_soon(self.flush_acks)
        self._ack_batch.append(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self.channel.connection is None:  # closed since the take: see ack()
            log.info("rejection of %s dropped: its channel is closed", delivery_tag)
            return
        if not requeue and self._set_aside_rejected(delivery_tag):
            VirtualQoS.ack(self, delivery_tag)  # the prefetch slot is free
            return
        super().reject(delivery_tag, requeue)

    def _set_aside_rejected(self, delivery_tag: str) -> bool:
        """A rejection without requeue drops the message (kombu's way): celery-batches does
        it to a request whose ``eta`` it cannot convert, Celery to a task raising
        ``Reject``. No message is acknowledged into nothing: it goes, as it was taken, to
        ``<queue>.unreadable`` (False when it is no longer in unacked)."""
        message = self._delivered.get(delivery_tag)
        info = getattr(message, "delivery_info", None) or {}
        queue = str(info.get("routing_key") or "")
        if queue not in self.channel._acked_queues:
            return False
        try:
            moved = self.channel.set_aside(delivery_tag, queue)
        except self.channel.connection_errors:
            log.exception("message %s rejected and not set aside: left in unacked", delivery_tag)
            return True  # back after the visibility timeout: not dropped
        if moved:
            log.error(
                "message %s rejected without requeue: moved to %s, not dropped",
                delivery_tag,
                unreadable_key(queue),
            )
        return moved

    def flush_acks(self) -> None:
        """Remove the acknowledged messages from unacked, in one pipeline.

        Should it fail (broker gone), they stay in unacked and come back after the visibility
        timeout: delivered twice (the LRS answers 409 to the second), never lost.
        """
        tags, self._ack_batch = self._ack_batch, None
        if not tags:
            return
        if self.channel.connection is None:  # closed meanwhile: see ack()
            log.info("%d acknowledgement(s) dropped: their channel is closed", len(tags))
            return
        try:
            with self.channel.conn_or_acquire() as client:
                for start in range(0, len(tags), ACK_CHUNK):
                    chunk = tags[start : start + ACK_CHUNK]
                    self.channel._scripts_on(client).ack(
                        keys=[self.unacked_index_key, self.unacked_key], args=chunk, client=client
                    )
        except self.channel.connection_errors as exc:
            log.warning(
                "%d acknowledgement(s) not sent (%r): redelivered after the visibility timeout",
                len(tags),
                exc,
            )
        for tag in tags:  # the prefetch slots are free either way
            VirtualQoS.ack(self, tag)

    def restore_by_tag(
        self, tag: str, client: redis.Redis | None = None, leftmost: bool = False
    ) -> None:
        """Put one unacknowledged message back on its queue (a rejected or expired one).

        Kombu's version is a WATCH/MULTI transaction, which Redis refuses at maxmemory: the
        message would then stay in unacked until the visibility timeout. Here the message is
        prepared in Python (kombu's own routing and redelivered flags) and moved by one
        script, only if its record in unacked is still the one read.
        """
        channel = self.channel
        with channel.conn_or_acquire(client) as conn:
            record = conn.hget(self.unacked_key, tag)
            if record is None:
                conn.zrem(self.unacked_index_key, tag)
                return
            payload, exchange, routing_key = loads(bytes_to_str(record))
            with contextlib.suppress(KeyError, TypeError):
                payload["headers"]["redelivered"] = True
                payload["properties"]["delivery_info"]["redelivered"] = True
            priority = channel._get_message_priority(payload, reverse=False)
            targets = [
                channel._q_for_pri(queue, priority)
                for queue in channel._lookup(exchange, routing_key)
            ]
            channel._scripts_on(conn).restore(
                keys=[self.unacked_key, self.unacked_index_key, *targets],
                args=[tag, record, "left" if leftmost else "right", dumps(payload)],
                client=conn,
            )

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        # Kombu acts on one call out of `interval` (every ~100 s, and when polling starts);
        # the orphaned in-flight lists are looked at on the same beat.
        due = self._vrestore_count % interval == 0
        try:
            super().restore_visible(start, num, interval)
            if due:
                self.channel.recover_orphans()
        except redis.ResponseError as exc:
            if not is_oom(exc):
                raise
            # Kombu's restore lock is a plain SET: refused at maxmemory. Try again next beat.
            self.channel._note_oom()


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    # Only the plain queue is read (BLMOVE takes one source); see the module docstring.
    priority_steps: ClassVar[list[int]] = [0]
    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        NODE_OPTION,
        HEADER_KEY_OPTION,
        DEAD_LETTERS_OPTION,
    )
    xapi_node: str | None = None
    xapi_dead_letters: str = DEAD_LETTERS
    xapi_header_key: str | None = None  # hex; bookkeeping.derive_key

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError("xapi_worker.transport does not support global_keyprefix")
        self.node = self.xapi_node or f"{socket.gethostname()}.{os.getpid()}"
        #: the key of the bookkeeping headers' signature (None: not the worker's app)
        self.header_key = bytes.fromhex(self.xapi_header_key) if self.xapi_header_key else None
        self._started: set[str] = set()
        self._next_beat = 0.0
        self._polling: tuple[str, str | None] | None = None
        self._acked_queues: set[str] = set()
        # delivery tag -> its unacked record, for the messages _hand_over recorded in unacked
        # and has not yet passed to QoS.append (which then must not record them again)
        self.recorded: dict[str, str] = {}
        self._scripts: Scripts | None = None  # registered on first use
        self.poll_started = 0.0  # monotonic: when the pending poll was sent (watchdog.py)
        self._oom_logged = -1e9
        self._last_take = -1e9  # monotonic: when the last take returned
        self._queue_emptied = False  # the last take left the queue empty

    # --- the atomic take ---------------------------------------------------------------------
    def basic_consume(self, queue: str, *args: object, **kwargs: object) -> object:
        no_ack = args[0] if args else kwargs.get("no_ack")
        if not no_ack:
            # Only queues consumed with acknowledgements (the task queue) get in-flight
            # lists; Celery's remote-control replies (no_ack, one-shot reply queues) keep
            # kombu's BRPOP and leave no keys behind.
            self._acked_queues.add(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def _brpop_start(self, timeout: float = 1) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        queue = queues[0]
        if queue not in self._acked_queues:
            self._polling = (queue, None)
            self._in_poll = self.client.connection
            self.poll_started = time.monotonic()
            self.client.connection.send_command("BRPOP", queue, timeout or 0)
            return
        key = inflight_key(queue, self.node)
        # The heartbeat first: should it fail, no command is pending on the poll connection
        # (kombu's close reads the reply of a pending poll, and would wait for ever).
        self._before_take(queue, key)
        if not TAKING.is_set():
            # Paused (a full spool): no poll is sent; kombu asks again at its next turn of
            # the event loop, which timers bound, so this is no busy loop.
            return
        if self._queue_emptied:
            wait = self._last_take + GATHER_SECONDS - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        self._polling = (queue, key)
        self._in_poll = self.client.connection
        self.poll_started = time.monotonic()
        self.client.connection.send_command("BLMOVE", queue, key, "RIGHT", "LEFT", timeout or 0)

    def _brpop_read(self, **options: object) -> bool:
        try:
            queue, key = self._polling or ("", None)
            command = "BRPOP" if key is None else "BLMOVE"
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                # The next poll reconnects; a message the server moved meanwhile waits in
                # the in-flight list for the next start of this node.
                self.client.connection.disconnect()
                raise
            except redis.ResponseError as exc:
                if key is None or not is_oom(exc):
                    raise
                # Redis at maxmemory refuses BLMOVE (it may grow memory) but not the take
                # script: the worker drains the very queue that fills the memory.
                self._in_poll = None
                self._note_oom()
                raws = self._more(queue, key, include_first=True)
                if not raws:
                    time.sleep(1)  # as long as a BLMOVE would wait: no busy loop
                    raise kombu_redis.Empty() from None
                self._hand_over(queue, key, raws)
                return True
            if not reply or not queue:
                self._queue_emptied = False  # the poll waited: no gathering wait before the next
                raise kombu_redis.Empty()
            self._queue_cycle.rotate(queue)
            if key is None:
                self.connection._deliver(loads(bytes_to_str(reply[1])), queue)
            else:
                self._in_poll = None
                self._hand_over(queue, key, [reply, *self._more(queue, key)])
            return True
        finally:
            self._in_poll = None

    def _scripts_on(self, client: redis.Redis) -> Scripts:
        if self._scripts is None:
            self._scripts = Scripts(client)
        return self._scripts

    def _note_oom(self) -> None:
        now = time.monotonic()
        if now >= self._oom_logged + 60:
            log.warning(
                "the broker is at maxmemory (OOM): producers are refused; this worker keeps "
                "taking and delivering"
            )
            self._oom_logged = now

    def _more(self, queue: str, key: str, include_first: bool = False) -> list[bytes]:
        """The messages queued behind the one BLMOVE took (or, with ``include_first``, in its
        place), as many as prefetch allows."""
        room = self.qos.can_consume_max_estimate()
        count = min(TAKE_MAX, room if room is not None else TAKE_MAX)
        count -= 0 if include_first else 1
        self._last_take = time.monotonic()
        # Room left and nothing more to take: the queue is empty (room full: not known).
        self._queue_emptied = count >= 1
        if count < 1:
            return []
        with self.conn_or_acquire() as client:
            taken: list[bytes] = self._scripts_on(client).take(
                keys=[queue, key], args=[count], client=client
            )
        self._queue_emptied = len(taken) < count
        return taken

    def _hand_over(self, queue: str, key: str, raws: list[bytes]) -> None:
        """Record the taken messages in unacked, then deliver them, oldest first.

        One MULTI/EXEC moves them all from the in-flight list to unacked: each is in one
        place or the other, never in neither. What is not a kombu message goes, in the same
        transaction, to ``<queue>.unreadable`` (kombu would drop it with a traceback), where
        an operator sees it (`xapi-worker status`); so does a compressed one, unread: kombu
        would decompress it whole (a few KB can expand to gigabytes), and Pod never
        compresses.
        """
        now = time.time()
        good: list[tuple[str, dict[str, Any]]] = []
        bad: list[bytes] = []
        for raw in raws:
            try:
                payload = loads(bytes_to_str(raw))
                if isinstance(payload.get("headers"), dict):
                    if payload["headers"].get(COMPRESSION) is not None:
                        raise ValueError("compressed")
                    self._stamp(payload["headers"], now, payload.get("body", ""))
                props = payload["properties"]
                tag = str(props["delivery_tag"])
                info = props["delivery_info"]
                record = dumps([payload, info["exchange"], info["routing_key"]])
            except Exception:
                bad.append(raw)
                continue
            good.append((tag, payload))
            self.recorded[tag] = record
        args: list[Any] = [now, len(good), len(raws)]
        for tag, _ in good:
            args += [tag, self.recorded[tag]]
        args += [*raws, *bad]
        with self.conn_or_acquire() as client:
            keys = [self.qos.unacked_index_key, self.qos.unacked_key, key, unreadable_key(queue)]
            try:
                self._scripts_on(client).hand_over(keys=keys, args=args, client=client)
            except BaseException:
                for tag, _ in good:  # still in the in-flight list: back at this node's start
                    self.recorded.pop(tag, None)
                raise
        if bad:
            log.error(
                "not a kombu message on %s: moved to %s (%d; or compressed: never decompressed)",
                queue,
                unreadable_key(queue),
                len(bad),
            )
        failure: BaseException | None = None  # of a message a consumer holds: kombu's path
        for tag, payload in good:
            try:
                self.connection._deliver(payload, queue)
            except Exception as exc:  # deliver the rest first
                if self.recorded.pop(tag, None) is None:
                    failure = failure or exc
                    continue
                # Refused before it reached QoS.append (a body kombu cannot decode): set
                # aside, rather than restored after every visibility timeout.
                log.exception(
                    "message %s on %s cannot be delivered: moved to %s",
                    tag,
                    queue,
                    unreadable_key(queue),
                )
                with self.conn_or_acquire() as client:
                    pipe = client.pipeline()
                    self.qos._remove_from_indices(tag, pipe)
                    pipe.rpush(unreadable_key(queue), dumps(payload))
                    pipe.execute()
                continue
            if self.recorded.pop(tag, None) is not None:
                # Delivered to a consumer that does not acknowledge (its consumer changed
                # since the take): consumed, as with kombu.
                self.qos._remove_from_indices(tag).execute()
        if failure is not None:
            raise failure

    def set_aside(self, delivery_tag: str, queue: str) -> bool:
        """Move a message this channel holds from unacked to ``<queue>.unreadable`` (its
        record, as taken), in one script: for a message that can be neither read nor
        dead-lettered, which would otherwise come back at once, again and again. False when
        it was no longer in unacked."""
        keys = [self.qos.unacked_key, self.qos.unacked_index_key, unreadable_key(queue)]
        with self.conn_or_acquire() as client:
            return bool(self._scripts_on(client).set_aside(keys=keys, args=[delivery_tag]))

    def _stamp(self, headers: dict[str, Any], now: float, body: object) -> None:
        """When the message was taken (every take: the visibility timeout counts from it),
        the digest of its body (every take, whatever the message said), and, unless a worker
        signed its bookkeeping for this body and this ``eta``, that of a new message first
        seen now, signed: a producer's ``xapi_*`` headers are not trusted (bookkeeping.py),
        nor its ``eta`` or ``expires`` (dropped: only a worker's signed retry waits), nor a
        signed header set put on another message. Stamped in the copy recorded in unacked,
        so a redelivery after a crash keeps its first take."""
        headers[bookkeeping.TAKEN_AT] = now
        key = self.header_key
        task_id = headers.get("id")
        if key is None:  # not the worker's app (no key given): the first take's time only
            headers.setdefault(FIRST_SEEN, iso(now))
            return
        digest = bookkeeping.body_digest(body)
        headers[names.BODY_SHA256] = digest
        headers.pop(names.EXPIRES, None)  # a producer's; the workers set none
        if not isinstance(task_id, str):
            for name in (bookkeeping.ATTEMPT, bookkeeping.LONE_FAILURES, bookkeeping.MAC):
                headers.pop(name, None)
            headers.pop(names.ETA, None)
            headers[FIRST_SEEN] = iso(now)
        elif not bookkeeping.is_signed(key, task_id, headers):
            headers.pop(names.ETA, None)  # only a worker's retry is held until due
            headers.update(bookkeeping.signed_headers(key, task_id, 1, iso(now), 0, None, digest))

    def _sign_retry(self, message: dict[str, Any]) -> None:
        """A worker's retry (its bookkeeping in the headers, unsigned: worker.py) is signed
        as it is queued, over its ``eta`` and its body as they travel."""
        headers = message.get("headers")
        key = self.header_key
        if key is None or not isinstance(headers, dict) or bookkeeping.ATTEMPT not in headers:
            return
        task_id = headers.get("id")
        if not isinstance(task_id, str) or bookkeeping.MAC in headers:
            return
        headers[bookkeeping.MAC] = bookkeeping.sign(
            key,
            task_id,
            headers.get(bookkeeping.ATTEMPT),
            headers.get(bookkeeping.FIRST_SEEN),
            headers.get(bookkeeping.LONE_FAILURES),
            headers.get(names.ETA),
            bookkeeping.body_digest(message.get("body", "")),
        )

    # --- the worker's own writes, at maxmemory too (scripts.py) ------------------------------
    # Kombu sends these in a MULTI, one command per priority list. Redis refuses any MULTI at
    # maxmemory, even for LLEN or DEL, and this transport reads the plain queue only
    # (priority_steps): one plain command each.
    def _size(self, queue: str) -> int:
        with self.conn_or_acquire() as client:
            return int(client.llen(queue))

    def _has_queue(self, queue: str, **kwargs: object) -> bool:
        with self.conn_or_acquire() as client:
            return bool(client.exists(queue))

    def _purge(self, queue: str) -> int:
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.llen(queue)
            pipe.delete(queue)
            size, _ = pipe.execute()
            return int(size)

    def _delete(
        self,
        queue: str,
        exchange: str,
        routing_key: str,
        pattern: str,
        *args: object,
        **kwargs: Any,  # noqa: ANN401 (kombu's signature)
    ) -> None:
        # (a remote-control reply queue, deleted after each reply)
        self.auto_delete_queues.discard(queue)
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])
        with self.conn_or_acquire(client=kwargs.get("client")) as client:
            client.srem(self.keyprefix_queue % (exchange,), member)
            client.delete(queue)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: object) -> None:
        """Publish (the worker's retries, remote-control replies): kombu's LPUSH, as a
        script. Producers on the frontal use kombu's own transport and are refused at
        maxmemory; the worker republishes what it acknowledges, and so grows nothing."""
        self._sign_retry(message)
        priority = self._get_message_priority(message, reverse=False)
        with self.conn_or_acquire() as client:
            push(client, self._q_for_pri(queue, priority), [dumps(message)])

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Kombu records each binding with SADD at every start (with a new reply queue of
        remote control each time), which Redis refuses at maxmemory: a worker could then
        never start to drain a full broker. Refused, the member is added by a script: a
        few bytes, once per start."""
        try:
            super()._queue_bind(exchange, routing_key, pattern, queue)
        except redis.ResponseError as exc:
            if not is_oom(exc):
                raise
            member = self.sep.join([routing_key or "", pattern or "", queue or ""])
            with self.conn_or_acquire() as client:
                self._scripts_on(client).add_member(
                    keys=[self.keyprefix_queue % (exchange,)], args=[member], client=client
                )

    # --- start, heartbeat, recovery ----------------------------------------------------------
    def _before_take(self, queue: str, key: str) -> None:
        now = time.monotonic()
        first = queue not in self._started
        if not first and now < self._next_beat:
            return
        ttl = max(30, int(self.visibility_timeout))
        with self.conn_or_acquire() as client:
            # Registered again on each beat: another node may have dropped this list from the
            # registry while this one was busy past its heartbeat (it then only returned an
            # empty list, or a message that this node also records: a duplicate, not a loss).
            self._scripts_on(client).heartbeat(
                keys=[key + ALIVE, registry_key(queue)], args=[self.node, ttl, key], client=client
            )
            if first:
                returned = return_inflight(client, key, queue)
                folded = self._fold_priorities(client, queue)
                if returned:
                    log.warning(
                        "%d message(s) this node had taken but not recorded before it stopped: "
                        "back on queue %s",
                        returned,
                        queue,
                    )
                if folded:
                    log.warning("%d message(s) sent with a priority: moved to %s", folded, queue)
                self._started.add(queue)
        if first:  # kombu's own restore pass ran before this queue was known: look now
            self.recover_orphans()
        self._next_beat = now + min(HEARTBEAT_EVERY, ttl / 3)

    @staticmethod
    def _fold_priorities(client: redis.Redis, queue: str) -> int:
        return sum(
            move_all(client, f"{queue}{kombu_redis.Channel.sep}{step}", queue, "RIGHT", "LEFT")
            for step in PRIORITY_LISTS
        )

    def recover_orphans(self) -> None:
        """Return the in-flight lists of nodes whose heartbeat expired (removed nodes)."""
        for queue in list(self._started):
            registry = registry_key(queue)
            own = inflight_key(queue, self.node)
            with self.conn_or_acquire() as client:
                for member in client.smembers(registry):
                    key = bytes_to_str(member)
                    if key == own or client.exists(key + ALIVE):
                        continue
                    returned = return_inflight(client, key, queue)
                    if returned:
                        log.warning(
                            "%d message(s) taken by a node gone for more than the visibility "
                            "timeout (%s): back on queue %s",
                            returned,
                            key,
                            queue,
                        )
                    # The dead letters it had claimed from the broker's list to move them
                    # to its disk (deadstore.move_legacy) go back to the head of that list,
                    # in their order, in one script: nothing else would ever see them once
                    # the node leaves the registry. Those it had committed already are not
                    # added twice to that disk (each element's SHA-256 is its origin).
                    claimed = move_all(
                        client, key + DEAD_CLAIM, self.xapi_dead_letters, "RIGHT", "LEFT"
                    )
                    if claimed:
                        log.warning(
                            "%d dead letter(s) claimed by a node gone for more than the "
                            "visibility timeout (%s): back on %s",
                            claimed,
                            key,
                            self.xapi_dead_letters,
                        )
                    client.srem(registry, key)
                self._fold_priorities(client, queue)

    def close(self) -> None:
        try:
            if self._qos is not None:
                self._qos.flush_acks()
        except Exception:  # not fatal: those messages come back after the visibility timeout
            log.debug("acknowledgements not flushed at close", exc_info=True)
        # A node that stops cleanly gives up its heartbeat: should it never come back, other
        # nodes return what a last BLMOVE may have left in its list on their next pass.
        if self._started and not self._closing:
            try:
                with self.conn_or_acquire() as client:
                    for queue in self._started:
                        client.delete(inflight_key(queue, self.node) + ALIVE)
            except Exception:  # the broker may be the reason we close
                log.debug("heartbeat not removed at close", exc_info=True)
        super().close()


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """``broker_transport = "xapi-redis"`` (the alias registered below), on ``redis://`` and
    ``rediss://`` URLs alike (kombu parses the URL, TLS options included, as for its own)."""

    Channel = Channel
    hub: Hub | None = None  # Celery's event loop, once registered with it

    def register_with_event_loop(self, connection: object, loop: Hub) -> None:
        self.hub = loop
        super().register_with_event_loop(connection, loop)
        every = watchdog.interval()
        if every is not None and not self._watchdog_armed:
            self._watchdog_armed = True
            loop.call_repeatedly(every, watchdog.feeder(self._poll_waits))
            log.info("systemd watchdog: fed every %.1f s while the consumer polls", every)

    _watchdog_armed = False

    def _poll_waits(self) -> list[float]:
        now = time.monotonic()
        return [
            now - channel.poll_started
            for channel in list(self.channels)
            if getattr(channel, "_in_poll", None) and getattr(channel, "poll_started", 0.0)
        ]


# The name Celery prints ("Connected to xapi-redis://host:port/db") and resolves.
TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")

__all__ = [
    "ALIAS",
    "NODE_OPTION",
    "TAKING",
    "Transport",
]
