"""The transport's in-flight lists (transport.py): a message taken from the queue is in the
queue, in its node's in-flight list or in ``unacked``, never nowhere; what a dead node left in
flight comes back. Real redis-server, Ralph and Celery workers."""

from __future__ import annotations

import json
import socket
import threading
import time

from celery import Celery
from kombu import Connection, Consumer, Exchange, Queue
from kombu.message import Message
from support import (
    TASK_NAME,
    Proxy,
    pod_producer,
    wait_for,
)
from xapi_testsupport.statements import video_statement
from xapi_worker.transport import ALIAS, NODE_OPTION

HOST = socket.gethostname()


def _inflight(node: str) -> str:
    return f"xapi.inflight.{node}@{HOST}"


def test_message_taken_by_a_node_that_died_is_delivered_when_it_restarts(
    redis_srv, ralph, make_config, start_worker
):
    statements = [video_statement("played", n) for n in range(3)]
    with pod_producer(redis_srv.url()) as delay:
        for statement in statements:
            delay(statement)
    r = redis_srv.client()
    # The state a SIGKILL leaves right after the worker's BLMOVE, before its MULTI/EXEC:
    # the message is in node n1's in-flight list and nowhere else.
    key = _inflight("n1")
    assert r.lmove("xapi", key, "RIGHT", "LEFT") is not None
    r.sadd("xapi.inflight", key)
    assert (r.llen("xapi"), r.llen(key), r.hlen("unacked")) == (2, 1, 0)

    worker = start_worker(make_config(ralph.url), name="n1")
    assert wait_for(lambda: len(ralph.stored()) >= 3, 30), worker.text()[-3000:]
    assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in statements)
    assert "1 message(s) this node had taken but not recorded" in worker.text()
    assert wait_for(lambda: r.llen(key) == 0 and r.hlen("unacked") == 0, 10)


def test_in_flight_list_of_a_node_gone_for_good_is_returned_by_another(
    redis_srv, ralph, make_config, start_worker
):
    with pod_producer(redis_srv.url()) as delay:
        delay(video_statement("paused", 1))
        delay(video_statement("paused", 2))
    r = redis_srv.client()
    gone, alive = _inflight("gone"), _inflight("busy")
    r.lmove("xapi", gone, "RIGHT", "LEFT")  # no heartbeat: its node is gone
    r.lmove("xapi", alive, "RIGHT", "LEFT")
    r.set(alive + ".alive", "busy", ex=300)  # a live node's message is not taken from it
    r.sadd("xapi.inflight", gone, alive)

    worker = start_worker(make_config(ralph.url), name="other")
    assert wait_for(lambda: len(ralph.stored()) >= 1, 30), worker.text()[-3000:]
    assert "taken by a node gone for more than the visibility timeout" in worker.text()
    assert r.llen(gone) == 0 and not r.sismember("xapi.inflight", gone)
    assert r.llen(alive) == 1 and len(ralph.stored()) == 1


def test_worker_keeps_in_flight_empty_and_heartbeat_while_it_works(
    redis_srv, ralph, make_config, start_worker
):
    proxy = Proxy(upstream_port=ralph.port, delay=1.0).start()
    try:
        with pod_producer(redis_srv.url()) as delay:
            for n in range(30):
                delay(video_statement("seeked", n))
        worker = start_worker(
            make_config(proxy.url, XAPI_WORKER_BATCH_SIZE=10, XAPI_WORKER_VISIBILITY_TIMEOUT=40),
            name="hb",
        )
        r = redis_srv.client()
        key = _inflight("hb")
        # While the LRS is slow, taken messages wait in unacked; the in-flight list only holds
        # messages for the instant between the take and the MULTI that records them.
        assert wait_for(lambda: r.hlen("unacked") > 0, 20), worker.text()[-3000:]
        assert wait_for(lambda: r.llen(key) == 0, 5)
        assert r.sismember("xapi.inflight", key)
        assert 0 < r.ttl(key + ".alive") <= 40
        assert wait_for(lambda: len(ralph.stored()) >= 30, 60), worker.text()[-3000:]
        assert wait_for(lambda: r.hlen("unacked") == 0 and r.llen(key) == 0, 10)
        worker.stop()
        # A clean stop gives up the heartbeat, so a node that never comes back is recovered.
        assert not r.exists(key + ".alive")
    finally:
        proxy.stop()


def test_messages_sent_with_a_priority_are_not_stranded(
    redis_srv, ralph, make_config, start_worker
):
    app = Celery("xapi_tasks", broker=redis_srv.url())  # kombu's own transport, as on Pod
    statement = video_statement("completed", 7)
    try:
        app.send_task(TASK_NAME, args=[statement], queue="xapi", priority=5)
    finally:
        app.close()
    r = redis_srv.client()
    assert r.llen("xapi\x06\x163") == 1  # kombu's priority list, which BLMOVE cannot read
    worker = start_worker(make_config(ralph.url))
    assert wait_for(lambda: ralph.stored_ids() == [statement["id"]], 30), worker.text()[-3000:]
    assert "sent with a priority: moved to xapi" in worker.text()


def test_garbage_on_the_queue_is_set_aside_and_the_rest_delivered(
    redis_srv, ralph, make_config, start_worker
):
    r = redis_srv.client()
    r.lpush("xapi", b"\x80 not a kombu message")
    with pod_producer(redis_srv.url()) as delay:
        delay(video_statement("terminated", 3))
    worker = start_worker(make_config(ralph.url))
    assert wait_for(lambda: len(ralph.stored()) == 1, 30), worker.text()[-3000:]
    assert r.lrange("xapi.unreadable", 0, -1) == [b"\x80 not a kombu message"]
    assert "not a kombu message on xapi: moved to xapi.unreadable" in worker.text()
    assert r.llen("xapi") == 0


def _consume(url: str, prefetch: int) -> tuple[Connection, list[Message]]:
    """A kombu consumer of the queue on the worker's transport, without Celery's event loop
    (so acknowledgements are sent one by one, as kombu does)."""
    conn = Connection(url, transport=ALIAS, transport_options={NODE_OPTION: "plain"})
    channel = conn.channel()
    channel.basic_qos(0, prefetch, False)
    got: list[Message] = []
    queue = Queue("xapi", Exchange("xapi", "direct"), "xapi")
    Consumer(
        channel, [queue], callbacks=[lambda _body, m: got.append(m)], accept=["json"]
    ).consume()
    return conn, got


def test_messages_behind_the_first_are_taken_together_up_to_the_prefetch_limit(redis_srv):
    statements = [video_statement("played", n) for n in range(30)]
    with pod_producer(redis_srv.url()) as delay:
        for statement in statements:
            delay(statement)
    r = redis_srv.client()
    conn, got = _consume(redis_srv.url(), prefetch=12)
    try:
        conn.drain_events(timeout=5)  # one BLMOVE answer
        # The 11 behind it came in the same take; the rest waits for free prefetch slots.
        assert len(got) == 12
        assert (r.llen("xapi"), r.hlen("unacked"), r.zcard("unacked_index")) == (18, 12, 12)
        assert r.llen("xapi.inflight.plain") == 0
        # Oldest first, as BLMOVE would have taken them one by one.
        assert [m.payload[0][0]["id"] for m in got] == [s["id"] for s in statements[:12]]
        for m in got[:5]:
            m.ack()
        assert r.hlen("unacked") == 7
        conn.drain_events(timeout=5)  # room for 5 more
        assert len(got) == 17 and r.llen("xapi") == 13
    finally:
        conn.release()


def test_acknowledging_on_a_closed_channel_is_dropped_and_the_message_comes_again(redis_srv):
    """A batch taken on a connection that dropped and was replaced (a broker restart) is
    acknowledged once its POST returns, on the old, closed channel. That used to raise in the
    event loop and stop the worker ("Unrecoverable error: AttributeError"). The close put the
    messages back: the acknowledgement is dropped, and the messages come again."""
    statements = [video_statement("played", n) for n in range(6)]
    with pod_producer(redis_srv.url()) as delay:
        for statement in statements:
            delay(statement)
    r = redis_srv.client()
    conn, got = _consume(redis_srv.url(), prefetch=10)
    conn.drain_events(timeout=5)
    assert len(got) == 6
    conn.release()  # the channel closes and puts back what it held
    got[0].ack()
    got[1].reject(requeue=True)
    got[2].reject(requeue=False)
    assert (r.llen("xapi"), r.hlen("unacked")) == (6, 0)
    again, got_again = _consume(redis_srv.url(), prefetch=10)
    try:
        again.drain_events(timeout=5)
        ids = sorted(m.payload[0][0]["id"] for m in got_again)
        assert ids == sorted(s["id"] for s in statements)
    finally:
        again.release()


def test_acknowledgements_of_a_batch_leave_unacked_together(
    redis_srv, ralph, make_config, start_worker
):
    with pod_producer(redis_srv.url()) as delay:
        for n in range(250):
            delay(video_statement("played", n))
    r = redis_srv.client()
    commands: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # the worker's idle BLMOVE (1 s timeout) keeps events coming
        with r.monitor() as monitor:
            for event in monitor.listen():
                name = event["command"].split(" ", 1)[0]
                # the commands inside a script are told apart: "lua:ZREM"
                lua = event.get("client_type") == "lua"
                commands.append(f"lua:{name}" if lua else name)
                if stop.is_set():
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.5)
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=100))
    done = wait_for(lambda: len(ralph.stored()) >= 250 and r.hlen("unacked") == 0, 60)
    stop.set()
    watcher.join(10)
    assert done, worker.text()[-3000:]
    # 250 statements: a few takes and acknowledgement scripts, not one of each per message.
    assert 0 < commands.count("lua:ZREM") <= 10, commands.count("lua:ZREM")
    # Takes, hand-overs, acknowledgements and heartbeats are scripts (scripts.py), a few per
    # batch, not one command per message.
    assert 0 < commands.count("EVALSHA") <= 40, commands.count("EVALSHA")
    assert commands.count("ZREM") == commands.count("HSET") == 0


def test_message_kombu_cannot_decode_is_set_aside_and_the_rest_delivered(
    redis_srv, ralph, make_config, start_worker
):
    r = redis_srv.client()
    # A well-formed envelope whose body kombu refuses (bad base64), queued before a good one.
    broken = {
        "body": "%%% not base64 %%%",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": TASK_NAME, "id": "broken-1"},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "broken-tag",
            "delivery_info": {"exchange": "xapi", "routing_key": "xapi"},
        },
    }
    r.lpush("xapi", json.dumps(broken))
    statement = video_statement("terminated", 4)
    with pod_producer(redis_srv.url()) as delay:
        delay(statement)
    worker = start_worker(make_config(ralph.url))
    assert wait_for(lambda: ralph.stored_ids() == [statement["id"]], 30), worker.text()[-3000:]
    assert wait_for(lambda: r.llen("xapi.unreadable") == 1, 10), worker.text()[-3000:]
    assert json.loads(r.lindex("xapi.unreadable", 0))["properties"]["delivery_tag"] == "broken-tag"
    assert "cannot be delivered: moved to xapi.unreadable" in worker.text()
    assert wait_for(lambda: r.hlen("unacked") == 0 and r.llen("xapi") == 0, 10)
    assert "consumer: Connection to broker lost" not in worker.text()


def test_a_rejection_without_requeue_sets_the_message_aside(redis_srv):
    """celery-batches rejects without requeue a request whose ``eta`` it cannot convert, and
    kombu then drops the message: in no list, not at the LRS (review of the worker, L5). It
    goes, as it was taken, to ``xapi.unreadable``; a rejection with requeue puts back."""
    statements = [video_statement("played", n) for n in range(3)]
    with pod_producer(redis_srv.url()) as delay:
        for statement in statements:
            delay(statement)
    r = redis_srv.client()
    conn, got = _consume(redis_srv.url(), prefetch=10)
    try:
        conn.drain_events(timeout=5)
        assert len(got) == 3
        got[0].reject(requeue=False)
        got[1].reject(requeue=True)
        got[2].ack()
        assert (r.llen("xapi"), r.hlen("unacked")) == (1, 0)
        [record] = r.lrange("xapi.unreadable", 0, -1)
        payload = json.loads(record)[0]
        assert payload["headers"]["id"] == got[0].headers["id"]
    finally:
        conn.release()
