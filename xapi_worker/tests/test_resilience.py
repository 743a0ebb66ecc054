"""Faults: LRS down then back, worker SIGKILLed mid-batch, wrong password, dead letters."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

from support import (
    LRS_PASSWORD,
    Proxy,
    RedisServer,
    pod_producer,
    wait_for,
)
from xapi_testsupport.statements import video_statement


def _no_duplicates(ids: list[str]) -> None:
    dupes = [i for i, c in Counter(ids).items() if c > 1]
    assert not dupes, f"duplicate ids in the LRS: {dupes[:5]}"


def test_lrs_stopped_then_restarted_mid_stream(redis_srv, ralph, make_config, start_worker):
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=20))
    statements = [video_statement("played", n, with_id=n % 2 == 0) for n in range(300)]

    def produce() -> None:
        with pod_producer(redis_srv.url()) as delay:
            for statement in statements:
                delay(statement)
                time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    assert wait_for(lambda: len(ralph.stored()) > 0, 30)
    ralph.stop()
    time.sleep(2)
    ralph.start()
    producer.join()
    assert wait_for(lambda: len(ralph.stored()) >= 300, 60), worker.text()[-3000:]
    ids = ralph.stored_ids()
    _no_duplicates(ids)
    assert len(ids) == 300
    assert {s["id"] for s in statements if "id" in s} <= set(ids)
    assert "retry:" in worker.text()
    assert redis_srv.client().llen("xapi.dead_letters") == 0


def test_sigkill_mid_batch_loses_nothing(redis_srv, ralph, make_config, start_worker):
    proxy = Proxy(upstream_port=ralph.port, delay=0.5).start()
    try:
        visibility = 8
        config = make_config(
            proxy.url,
            XAPI_WORKER_BATCH_SIZE=25,
            XAPI_WORKER_VISIBILITY_TIMEOUT=visibility,
            XAPI_WORKER_READ_TIMEOUT=3,
        )
        statements = [video_statement("paused", n, with_id=n % 3 != 0) for n in range(200)]
        with pod_producer(redis_srv.url()) as delay:
            for statement in statements:
                delay(statement)
        worker = start_worker(config, name="victim")
        assert wait_for(lambda: 0 < len(ralph.stored()), 30), worker.text()
        worker.kill()  # SIGKILL to the worker's whole process group, mid-stream
        killed_at = time.monotonic()
        delivered_before = len(ralph.stored())
        assert delivered_before < 200
        r = redis_srv.client()
        assert r.hlen("unacked") + r.llen("xapi") > 0  # the rest is still in Redis
        # Unacknowledged messages come back once visibility_timeout has passed.
        time.sleep(max(0.0, visibility + 0.5 - (time.monotonic() - killed_at)))
        proxy.delay = 0
        worker2 = start_worker(config, name="victim")  # systemd restarts the same node
        # Whatever the instant of the kill, every message is in the queue, in the node's
        # in-flight list (transport.py) or in unacked: all 200 arrive, once.
        assert wait_for(lambda: len(set(ralph.stored_ids())) >= 200, 45), worker2.text()[-3000:]
        ids = ralph.stored_ids()
        _no_duplicates(ids)
        assert len(ids) == 200
        assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 10)
        assert r.llen("xapi.dead_letters") == 0
    finally:
        proxy.stop()


def test_wrong_password_keeps_everything_until_fixed(redis_srv, ralph, make_config, start_worker):
    bad = make_config(ralph.url, XAPI_LRS_PWD="wrong-password-123")
    worker = start_worker(bad)
    statements = [video_statement("seeked", n) for n in range(30)]
    with pod_producer(redis_srv.url()) as delay:
        for statement in statements:
            delay(statement)
    assert wait_for(lambda: "check XAPI_LRS_LOGIN/XAPI_LRS_PWD" in worker.text(), 30)
    time.sleep(1.5)  # a few retries
    worker.stop()
    text = worker.text()
    assert "ERROR" in text and "HTTP 401" in text
    assert "wrong-password-123" not in text and LRS_PASSWORD not in text
    assert ralph.stored() == []
    r = redis_srv.client()
    assert r.llen("xapi.dead_letters") == 0
    assert r.llen("xapi") + r.hlen("unacked") >= 30
    fixed = start_worker(make_config(ralph.url))
    assert wait_for(lambda: len(ralph.stored()) == 30, 30), fixed.text()
    assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in statements)


def test_dead_letters_list_replay_purge(redis_srv, ralph, make_config, start_worker):
    from support import run_cli

    proxy = Proxy(upstream_port=ralph.port, force_status=422).start()
    try:
        config = make_config(proxy.url, XAPI_WORKER_BATCH_SIZE=5)
        worker = start_worker(config)
        statements = [video_statement("completed", n) for n in range(5)]
        with pod_producer(redis_srv.url()) as delay:
            for statement in statements:
                delay(statement)
        r = redis_srv.client()
        assert wait_for(lambda: r.llen("xapi.dead_letters") == 5, 30), worker.text()
        listed = run_cli(config, "dead-letters", "list")
        assert listed.returncode == 0, listed.stderr
        entries = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {e["statement"]["id"] for e in entries} == {s["id"] for s in statements}
        assert {e["status"] for e in entries} == {422}
        assert all("forced by the test proxy" in e["response"] for e in entries)
        status = run_cli(config, "status")
        assert json.loads(status.stdout)["dead_letters"] == 5
        proxy.force_status = None  # the LRS accepts them now
        replay = run_cli(config, "dead-letters", "replay")
        assert replay.returncode == 0, replay.stderr
        assert "replayed 5" in replay.stdout
        assert wait_for(lambda: len(ralph.stored()) == 5, 30), worker.text()
        assert r.llen("xapi.dead_letters") == 0
        # purge needs --yes, then empties the list
        r.rpush("xapi.dead_letters", json.dumps({"statement": {}, "reason": "x"}))
        assert run_cli(config, "dead-letters", "purge").returncode == 2
        purged = run_cli(config, "dead-letters", "purge", "--yes")
        assert purged.returncode == 0 and "purged 1" in purged.stdout
        assert r.llen("xapi.dead_letters") == 0
    finally:
        proxy.stop()


def test_flush_timer_rearmed_after_broker_reconnects(tmp_path, ralph, make_config, start_worker):
    """celery-batches #107: the broker restarted while a batch was being gathered (the flush
    timer armed), three times; after each reconnect a few statements of a quiet queue must
    leave within a few flush intervals, not wait for a full batch of 100.

    Statements the worker had taken when the broker went down cannot be put back while it is
    down: they wait in `unacked` for the visibility timeout (30 s here) and a restore pass,
    then are delivered. Those are checked at the end, with that delay; the ones sent after
    each reconnect are the ones the flush timer must send at once."""
    broker = RedisServer(tmp_path / "durable", durable=True)
    try:
        config = make_config(ralph.url, XAPI_CELERY_BROKER_URL=broker.url())
        worker = start_worker(config)
        sent: list[str] = []
        with pod_producer(broker.url()) as delay:

            def send(count: int) -> list[str]:
                ids = []
                for _ in range(count):
                    statement = video_statement("played", len(sent), with_id=True)
                    delay(statement)
                    sent.append(statement["id"])
                    ids.append(statement["id"])
                    time.sleep(0.05)
                return ids

            for attempt in range(3):
                send(10)
                trickle = threading.Thread(target=send, args=(10,))
                trickle.start()
                time.sleep(0.2)  # mid-trickle: a batch is being gathered, its timer armed
                broker.restart()
                trickle.join()
                assert wait_for(lambda a=attempt: worker.text().count("Connected to") >= a + 2, 30)
                after = set(send(5))
                # Without the fix they wait for 100 more statements: for ever, on a quiet queue.
                assert wait_for(lambda a=after: a <= set(ralph.stored_ids()), 15), (
                    f"after reconnect {attempt + 1}: "
                    f"{len(after - set(ralph.stored_ids()))} of 5 statements still waiting"
                )
        r = broker.client()
        assert wait_for(lambda: set(sent) <= set(ralph.stored_ids()), 150, interval=1), (
            f"{len(set(sent) - set(ralph.stored_ids()))} never delivered; "
            f"unacked {r.hlen('unacked')}, queue {r.llen('xapi')}"
        )
        _no_duplicates(ralph.stored_ids())
    finally:
        broker.stop()
