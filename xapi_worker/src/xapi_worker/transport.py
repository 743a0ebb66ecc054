"""Kombu's Redis transport, with its one loss window closed.

Kombu (5.5) takes a message off the queue with ``BRPOP`` and only then, in a second round
trip, records it in the ``unacked`` hash. A worker killed between the two (SIGKILL, OOM, a
host reset, a warm shutdown with a ``BRPOP`` answer still unread: celery/celery#4354) loses
that message: it is in neither place. Here the message goes, in one atomic ``BLMOVE``, from
the queue to an in-flight list of this worker node (``xapi.inflight.<node>``); it leaves that
list in the same ``MULTI``/``EXEC`` that writes it to ``unacked``. So at every instant a
message is in the queue, in an in-flight list or in ``unacked``.

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

import logging
import os
import socket
import time
from typing import ClassVar

import redis
from kombu.message import Message
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

log = logging.getLogger("xapi_worker.transport")

ALIAS = "xapi-redis"
#: Transport option (``broker_transport_options``) naming the worker node; set by the app at
#: ``celeryd_init``, before the worker connects.
NODE_OPTION = "xapi_node"
INFLIGHT = ".inflight"  # <queue>.inflight: set of the in-flight lists of <queue>
ALIVE = ".alive"
#: How often a consuming node refreshes its heartbeat key, at most (seconds).
HEARTBEAT_EVERY = 10.0
#: Kombu's priority lists that producers may have used (see the module docstring).
PRIORITY_LISTS = tuple(kombu_redis.PRIORITY_STEPS[1:])


def registry_key(queue: str) -> str:
    return queue + INFLIGHT


def inflight_key(queue: str, node: str) -> str:
    return f"{queue}{INFLIGHT}.{node}"


def unreadable_key(queue: str) -> str:
    return queue + ".unreadable"


def move_all(client: redis.Redis, source: str, destination: str, src_end: str, dst_end: str) -> int:
    """Move every element of list ``source`` to ``destination``, one atomic ``LMOVE`` each."""
    moved = 0
    while client.lmove(source, destination, src_end, dst_end) is not None:
        moved += 1
    return moved


def return_inflight(client: redis.Redis, key: str, queue: str) -> int:
    """Push an in-flight list back to the consuming end of its queue, oldest first out.

    ``BLMOVE`` put the newest on the left of the in-flight list; taking from the left and
    pushing on the right (where consumers pop) leaves the oldest next in line.
    """
    return move_all(client, key, queue, "LEFT", "RIGHT")


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def append(self, message: Message, delivery_tag: str) -> None:
        pending = self.channel.connection.take_pending()
        if pending is None:  # not a message of ours (basic_get, a restore): kombu's way
            super().append(message, delivery_tag)
            return
        key, raw = pending
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.pipe_or_acquire() as pipe:
            # One MULTI/EXEC: the message is in unacked or still in the in-flight list,
            # never in neither.
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, record)
            pipe.lrem(key, 1, raw)
            pipe.execute()
        VirtualQoS.append(self, message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        # Kombu acts on one call out of `interval` (every ~100 s, and when polling starts);
        # the orphaned in-flight lists are looked at on the same beat.
        due = self._vrestore_count % interval == 0
        super().restore_visible(start, num, interval)
        if due:
            self.channel.recover_orphans()


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    # Only the plain queue is read (BLMOVE takes one source); see the module docstring.
    priority_steps: ClassVar[list[int]] = [0]
    from_transport_options = (*kombu_redis.Channel.from_transport_options, NODE_OPTION)
    xapi_node: str | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError("xapi_worker.transport does not support global_keyprefix")
        self.node = self.xapi_node or f"{socket.gethostname()}.{os.getpid()}"
        self._started: set[str] = set()
        self._next_beat = 0.0
        self._polling: tuple[str, str | None] | None = None
        self._acked_queues: set[str] = set()

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
        self._in_poll = self.client.connection
        if queue not in self._acked_queues:
            self._polling = (queue, None)
            self.client.connection.send_command("BRPOP", queue, timeout or 0)
            return
        key = inflight_key(queue, self.node)
        self._before_take(queue, key)
        self._polling = (queue, key)
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
            if not reply or not queue:
                raise kombu_redis.Empty()
            self._queue_cycle.rotate(queue)
            if key is None:
                self.connection._deliver(loads(bytes_to_str(reply[1])), queue)
            else:
                self._hand_over(queue, key, reply)
            return True
        finally:
            self._in_poll = None

    def _hand_over(self, queue: str, key: str, raw: bytes) -> None:
        transport = self.connection
        transport.pending = (key, raw)
        try:
            transport._deliver(loads(bytes_to_str(raw)), queue)
        except Exception:
            if transport.take_pending() is None:
                raise  # recorded in unacked: kombu's and Celery's usual error path
            # Not a kombu message (kombu would drop it with a traceback): set it aside where
            # an operator sees it (`xapi-worker status`), instead of looping on it.
            log.exception("not a kombu message on %s: moved to %s", queue, unreadable_key(queue))
            with self.conn_or_acquire() as client:
                client.lmove(key, unreadable_key(queue), "LEFT", "RIGHT")
            return
        if transport.take_pending() is not None:
            # Delivered to a consumer that does not acknowledge (its consumer changed since
            # the take): consumed, as with kombu.
            with self.conn_or_acquire() as client:
                client.lrem(key, 1, raw)

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
            pipe = client.pipeline()
            pipe.set(key + ALIVE, self.node, ex=ttl)
            pipe.sadd(registry_key(queue), key)
            pipe.execute()
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
                    client.srem(registry, key)
                self._fold_priorities(client, queue)

    def close(self) -> None:
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

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.pending: tuple[str, bytes] | None = None

    def take_pending(self) -> tuple[str, bytes] | None:
        pending, self.pending = self.pending, None
        return pending


# The name Celery prints ("Connected to xapi-redis://host:port/db") and resolves.
TRANSPORT_ALIASES.setdefault(ALIAS, f"{__name__}:Transport")

__all__ = ["ALIAS", "NODE_OPTION", "Transport", "inflight_key", "registry_key"]
