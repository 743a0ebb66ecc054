"""The worker trusts nothing it cannot verify: LRS answers, conflicts, poison statements,
broker errors. Real redis-server, Ralph and Celery; a proxy only where an answer Ralph never
gives is needed (a maintenance page, a 500 for one statement)."""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support import (
    LRS_PASSWORD,
    LRS_USER,
    Proxy,
    RedisServer,
    disk_dead_letters,
    pod_producer,
    wait_for,
)
from xapi_testsupport.statements import invalid, video_statement
from xapi_worker.bookkeeping import MAC, derive_key, unsigned_headers
from xapi_worker.delivery import POISON_AFTER, Item, Result, Verdict, deliver
from xapi_worker.lrs import LRSClient
from xapi_worker.settings import settings_from_mapping
from xapi_worker.spool import Spool
from xapi_worker.transport import ALIAS, HEADER_KEY_OPTION

JSON = {"Content-Type": "application/json"}


def _dead(r, spool_dir=None) -> list[dict]:
    """The dead letters in the broker's list and, with the spool on, on the disk."""
    kept = [json.loads(raw) for raw in r.lrange("xapi.dead_letters", 0, -1)]
    return kept + (disk_dead_letters(spool_dir) if spool_dir is not None else [])


def test_a_maintenance_page_answering_200_is_not_a_delivery(
    redis_srv, ralph, make_config, start_worker
):
    """A proxy's HTML 200 used to be taken as a delivery: every statement acked and lost."""
    page = b"<html><body>Maintenance in progress</body></html>"
    state = {"maintenance": True}

    def respond(req):
        if req.method == "POST" and state["maintenance"]:
            return 200, {"Content-Type": "text/html"}, page
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    try:
        worker = start_worker(make_config(proxy.url))
        sent = [video_statement("played", n) for n in range(12)]
        with pod_producer(redis_srv.url()) as delay:
            for statement in sent:
                delay(statement)
        assert wait_for(lambda: "not taken as a delivery" in worker.text(), 20), worker.text()
        assert wait_for(lambda: len(proxy.requests) >= 3, 20)
        assert ralph.stored() == []
        state["maintenance"] = False  # the LRS is back behind its proxy
        assert wait_for(lambda: len(ralph.stored()) == len(sent), 30), worker.text()
        assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in sent)
        assert _dead(redis_srv.client()) == []
    finally:
        proxy.stop()


def test_a_conflicting_statement_is_dead_lettered_an_identical_one_delivered(
    redis_srv, ralph, make_config, start_worker
):
    """Ralph answers 409 when it holds a different statement under the id. That used to be
    acked as a duplicate; an identical re-send is delivered (Ralph: 204)."""
    original = video_statement("played", 1)
    assert ralph.post([original]) == 200
    other = json.loads(json.dumps(original))
    other["verb"] = {"id": "https://w3id.org/xapi/video/verbs/paused", "display": {"en": "p"}}
    fresh = [video_statement("seeked", n) for n in range(3)]
    with pod_producer(redis_srv.url()) as delay:
        for statement in [fresh[0], other, fresh[1], original, fresh[2]]:
            delay(statement)
    worker = start_worker(make_config(ralph.url))
    r = redis_srv.client()
    assert wait_for(lambda: len(_dead(r)) == 1, 30), worker.text()
    assert wait_for(lambda: len(ralph.stored()) == 4, 20), worker.text()
    (entry,) = _dead(r)
    assert entry["status"] == 409
    assert entry["statement"]["verb"]["id"].endswith("/paused")
    assert entry["conflict"]["id"] == original["id"]
    assert entry["conflict"]["sent_sha256"] != entry["conflict"]["stored_sha256"]
    assert "different statement" in entry["reason"]
    stored = [s for s in ralph.stored() if s["id"] == original["id"]]
    assert len(stored) == 1 and stored[0]["verb"]["id"] == original["verb"]["id"]


def test_one_poison_statement_does_not_hold_its_batch_mates(
    redis_srv, ralph, make_config, start_worker
):
    """A statement that makes the LRS fail its whole bulk with a 500 used to hold every
    statement of its batch until the maximum age. After three failures the batch is split."""
    poison = video_statement("paused", 666)
    marker = poison["id"].encode()

    def respond(req):
        if req.method == "POST" and marker in req.body:
            return 500, JSON, b'{"detail":"Statements bulk indexation failed"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    try:
        good = [video_statement("played", n) for n in range(20)]
        with pod_producer(redis_srv.url()) as delay:
            for statement in [*good[:7], poison, *good[7:]]:
                delay(statement)
        worker = start_worker(make_config(proxy.url))
        r = redis_srv.client()
        assert wait_for(lambda: len(ralph.stored()) == len(good), 60), worker.text()
        assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in good)
        assert wait_for(lambda: len(_dead(r)) == 1, 30), worker.text()
        (entry,) = _dead(r)
        assert entry["statement"]["id"] == poison["id"]
        assert entry["status"] == 500 and "alone" in entry["reason"]
        assert entry["attempts"] >= 3
    finally:
        proxy.stop()


def test_a_balancer_with_one_broken_backend_dead_letters_no_valid_statement(ralph):
    """A 5xx or a timeout alone used to be evidence against a statement: once tried
    ISOLATE_AFTER times, a statement failing alone while its batch-mates were stored was
    dead-lettered. Behind a balancer whose second backend answers 503 to every other POST,
    that was about one valid statement per batch of 100. Now: the real Ralph behind such a
    balancer, deliver() as the worker calls it, round after round; a true poison (a 500
    for any POST holding it) is still dead-lettered, once it has failed alone in
    POISON_AFTER separate exchanges."""
    posts = iter(range(10**6))
    poison = video_statement("paused", 666)
    marker = poison["id"].encode()

    def balancer(req):
        if req.method != "POST":
            return None
        broken = next(posts) % 2 == 1
        if marker in req.body:
            return 500, JSON, b'{"detail":"Statements bulk indexation failed"}'
        if broken:
            return 503, {"Content-Type": "text/html"}, b"<html>503 Service Unavailable</html>"
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=balancer).start()
    settings = settings_from_mapping(
        {
            "XAPI_LRS_URL": proxy.url,
            "XAPI_LRS_LOGIN": LRS_USER,
            "XAPI_LRS_PWD": LRS_PASSWORD,
            "XAPI_CELERY_BROKER_URL": "redis://127.0.0.1:1/6",
        }
    )
    lrs = LRSClient(settings)
    # 300 statements queued, then 20 more per batch (live traffic), every one tried
    # three times already: every failing batch is split.
    good = [video_statement("played", n) for n in range(300)]
    pending = [Item(f"t{n}", s, attempt=3) for n, s in enumerate(good)]
    pending.insert(150, Item("poison", poison, attempt=3))
    dead: list[str] = []
    stored_before = False
    try:
        for _ in range(300):
            if not pending:
                break
            if len(good) < 600:
                fresh = [video_statement("played", len(good) + n) for n in range(20)]
                pending.extend(Item(s["id"], s, attempt=3) for s in fresh)
                good.extend(fresh)
            batch, pending = pending[:100], pending[100:]
            results = deliver(
                batch, lrs.post_statements, fetch=lrs.get_statement, stored_before=stored_before
            )
            stored_before = any(r.verdict is Verdict.DELIVERED for r in results)
            for res in results:
                if res.verdict is Verdict.DEAD:
                    dead.append(res.item.key)
                elif res.verdict is Verdict.RETRY:
                    res.item.attempt += 1
                    pending.append(res.item)
    finally:
        proxy.stop()
    assert dead == ["poison"], dead
    assert not pending
    stored = ralph.stored_ids()
    assert sorted(stored) == sorted(s["id"] for s in good)  # each once
    assert POISON_AFTER > 1


def test_retry_after_longer_than_the_retry_maximum_is_honoured(
    redis_srv, ralph, make_config, start_worker
):
    """Retry-After used to be capped at the maximum retry delay (1 s here)."""
    asked = 6
    posts: list[float] = []

    def respond(req):
        if req.method != "POST":
            return None
        posts.append(time.monotonic())
        if len(posts) == 1:
            return 503, {**JSON, "Retry-After": str(asked)}, b'{"detail":"maintenance"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    try:
        worker = start_worker(make_config(proxy.url))
        with pod_producer(redis_srv.url()) as delay:
            delay(video_statement("played", 1))
        assert wait_for(lambda: len(ralph.stored()) == 1, 30), worker.text()
        assert posts[1] - posts[0] >= asked - 0.5, posts
        assert "Retry-After" in worker.text()
    finally:
        proxy.stop()


def test_worker_drains_a_broker_at_maxmemory(tmp_path, ralph, start_worker, make_config):
    """At maxmemory Redis refuses every write that may grow memory. The worker used to be
    refused too, and crash-looped at start (Unrecoverable error: OutOfMemoryError): it could
    not drain the very queue that filled the memory."""
    srv = RedisServer(tmp_path / "oom", False, "--maxmemory", "3mb")
    try:
        r = srv.client()
        published, refused = [], 0
        with pod_producer(srv.url()) as delay:
            for n in range(5000):
                statement = video_statement("played", n)
                try:
                    delay(statement)
                except Exception as exc:  # kombu or redis-py, as Pod's view would see it
                    assert "OOM" in repr(exc) or "maxmemory" in repr(exc), repr(exc)
                    refused += 1
                    if refused >= 3:
                        break
                    continue
                published.append(statement["id"])
        assert refused >= 3, "the broker never reached maxmemory"
        info = r.info("memory")
        assert info["used_memory"] > info["maxmemory"] * 0.95
        worker = start_worker(make_config(ralph.url, XAPI_CELERY_BROKER_URL=srv.url()))
        pid = worker.proc.pid
        assert wait_for(lambda: len(ralph.stored()) == len(published), 120), worker.text()[-3000:]
        assert sorted(ralph.stored_ids()) == sorted(published)
        assert worker.proc.poll() is None and worker.proc.pid == pid
        assert "Unrecoverable error" not in worker.text()
        assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 20)
        # The producers are served again once the worker has drained the queue.
        with pod_producer(srv.url()) as delay:
            late = video_statement("completed", 1)
            delay(late)
        assert wait_for(lambda: late["id"] in ralph.stored_ids(), 30)
    finally:
        srv.stop()


def test_a_refused_heartbeat_write_stops_the_worker_it_does_not_hang(
    redis_srv, ralph, make_config, start_worker
):
    """The transport used to mark its poll as pending before the heartbeat write; when that
    write failed, kombu's close waited for ever for the reply of a poll never sent, and the
    process stayed alive consuming nothing. Here the write fails with WRONGTYPE."""
    r = redis_srv.client()
    r.set("xapi.inflight", "not a set")  # the registry of in-flight lists: SADD fails
    worker = start_worker(make_config(ralph.url), wait_ready=False)
    try:
        worker.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker hung after its heartbeat write failed:\n" + worker.text()[-3000:])
    assert worker.proc.returncode != 0
    assert "WRONGTYPE" in worker.text()


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    return sock, path


def _drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while sock.recv(256):
            pass
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(0.5)


def _pings(sock: socket.socket, seconds: float) -> int:
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(256) == b"WATCHDOG=1":
                count += 1
        except TimeoutError:
            pass
    return count


def test_watchdog_is_fed_while_consuming_and_starves_on_a_hung_broker(
    tmp_path, redis_srv, ralph, make_config, start_worker, monkeypatch
):
    """systemd's WatchdogSec= restarts a worker whose consumer no longer progresses. Fed
    from the event loop; not fed while a broker poll has waited past STUCK_AFTER (30 s)."""
    sock, path = _notify_socket(tmp_path)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(3_000_000)}
    worker = start_worker(make_config(ralph.url), extra_env=env)
    try:
        assert _pings(sock, 4) >= 2, worker.text()
        os.kill(redis_srv.proc.pid, signal.SIGSTOP)  # the broker hangs, for 45 s
        try:
            time.sleep(37)  # past STUCK_AFTER (30 s) and the socket timeouts (10 s)
            _drain(sock)  # the pings sent before it was stuck
            assert _pings(sock, 8) == 0, worker.text()[-3000:]  # systemd would restart it
        finally:
            os.kill(redis_srv.proc.pid, signal.SIGCONT)
        assert _pings(sock, 40) >= 1, worker.text()[-3000:]  # the broker is back: fed again
        with pod_producer(redis_srv.url()) as delay:
            statement = video_statement("played", 3)
            delay(statement)
        assert wait_for(lambda: statement["id"] in ralph.stored_ids(), 30), worker.text()
        assert LRS_PASSWORD not in worker.text()
    finally:
        sock.close()


def _forward(port: int, req) -> tuple[int, dict[str, str], bytes]:
    """Send ``req`` on to Ralph, as the proxy would; its answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {k: v for k, v in req.headers.items() if k.lower() != "host"}
    conn.request(req.method, req.path, body=req.body or None, headers=headers)
    resp = conn.getresponse()
    answer = resp.status, {"Content-Type": resp.getheader("Content-Type") or ""}, resp.read()
    conn.close()
    return answer


def _posted_ids(req) -> set[str]:
    try:
        return {s["id"] for s in json.loads(req.body)}
    except (ValueError, TypeError, KeyError):
        return set()


@contextlib.contextmanager
def _signing_producer(url: str):
    """An app that publishes as a worker re-publishes: on the worker's transport, with the
    key of the bookkeeping's signature (the transport signs, over the eta and the body)."""
    from celery import Celery

    app = Celery("signer", broker=url)
    app.conf.task_routes = {"pod.xapi.xapi_tasks.*": {"queue": "xapi"}}
    app.conf.broker_transport = ALIAS
    app.conf.broker_transport_options = {HEADER_KEY_OPTION: derive_key(LRS_PASSWORD, url).hex()}
    try:
        yield app
    finally:
        app.close()


def test_bookkeeping_headers_set_by_a_producer_are_not_trusted(
    redis_srv, ralph, make_config, start_worker
):
    """Any producer can set any header (Pod's frontal publishes with an ACL user that can):
    a message arriving with `xapi_lone_failures=9` was dead-lettered as poison on its first
    lone failure, one with an old `xapi_first_seen` as too old on its first failure. Only
    what a worker signed counts (bookkeeping.py): a worker's own re-published message still
    carries its first-seen time, and past the maximum age it is dead-lettered."""
    from celery import Celery

    forged_poison = video_statement("played", 1)
    forged_old = video_statement("played", 2)
    signed_old = video_statement("played", 3)
    good = [video_statement("played", n) for n in range(10, 14)]
    # POSTs still to fail (a broken backend) of those holding each statement
    failing = {forged_poison["id"]: 4, forged_old["id"]: 1}

    def respond(req):
        ids = _posted_ids(req) if req.method == "POST" else set()
        hit = [i for i in ids if failing.get(i, 0) > 0]
        if hit:
            for i in hit:
                failing[i] -= 1
            return 503, JSON, b'{"detail": "backend down"}'
        if signed_old["id"] in ids:
            return 503, JSON, b'{"detail": "backend down"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    app = Celery("producer", broker=redis_srv.url())
    app.conf.task_routes = {"pod.xapi.xapi_tasks.*": {"queue": "xapi"}}
    old_time = "2026-11-01T08:00:00.000+00:00"
    task = "pod.xapi.xapi_tasks.send_xapi_statement_task"
    try:
        app.send_task(
            task,
            args=[forged_poison],
            headers={"xapi_attempt": 5, "xapi_lone_failures": POISON_AFTER - 1},
        )
        task_id = "signed-by-a-worker"
        with _signing_producer(redis_srv.url()) as signer:
            signer.send_task(
                task, args=[signed_old], task_id=task_id, headers=unsigned_headers(2, old_time, 0)
            )
        for statement in good:
            app.send_task(task, args=[statement])
        worker = start_worker(make_config(proxy.url, XAPI_WORKER_MAX_AGE_DAYS=7))
        r = redis_srv.client()
        expected = sorted(s["id"] for s in [forged_poison, *good])
        assert wait_for(lambda: sorted(ralph.stored_ids()) == expected, 60), worker.text()
        # alone in its batch, so that its first failure is a retry (not a split)
        app.send_task(task, args=[forged_old], headers={"xapi_first_seen": old_time})
        expected = sorted([*expected, forged_old["id"]])
        assert wait_for(lambda: sorted(ralph.stored_ids()) == expected, 60), worker.text()
        assert wait_for(lambda: len(_dead(r)) == 1, 30), worker.text()
        (entry,) = _dead(r)
        assert entry["statement"]["id"] == signed_old["id"]
        assert entry["first_seen"].startswith("2026-11-01T08:00:00")
        assert "max age exceeded" in entry["reason"] and "HTTP 503" in entry["reason"]
        assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
    finally:
        app.close()
        proxy.stop()


def test_a_lone_post_that_timed_out_is_read_back_and_never_dead_lettered(
    redis_srv, ralph, make_config, start_worker
):
    """A lone POST that timed out counted as a lone failure without a look: a statement the
    LRS stored but answered too late for (`stored_late`) was dead-lettered after ten such
    exchanges. A timeout is "maybe stored": the statement is read back by id (GET),
    delivered when the LRS holds it, else retried later; only a read-back saying it is not
    held counts against it (`lost`: fewer times than make a poison). Ralph filters the ids
    it holds before it writes (a re-sent statement is answered 204): each is stored once."""
    stored_late = video_statement("played", 1)
    lost = video_statement("played", 2)
    # timeouts proven absent in fewer exchanges than make a poison (one more would:
    # test_a_statement_that_times_out_alone_again_and_again_is_poison_after_the_rule)
    lost_posts = {"left": POISON_AFTER - 1}

    def respond(req):
        ids = _posted_ids(req) if req.method == "POST" else set()
        if lost["id"] in ids and lost_posts["left"] > 0:
            lost_posts["left"] -= 1
            time.sleep(1.5)  # not stored, not answered in time
            return 503, JSON, b"{}"
        if stored_late["id"] in ids:
            answer = _forward(ralph.port, req)
            time.sleep(1.5)  # stored, answered after the worker's read timeout
            return answer
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    stop = threading.Event()
    others: list[dict] = []

    def feed(delay) -> None:  # the LRS stores others all along
        n = 100
        while not stop.wait(0.5):
            statement = video_statement("played", n)
            delay(statement)
            others.append(statement)
            n += 1

    try:
        worker = start_worker(make_config(proxy.url, XAPI_WORKER_READ_TIMEOUT=1))
        r = redis_srv.client()
        with pod_producer(redis_srv.url()) as delay:
            delay(stored_late)
            delay(lost)
            feeder = threading.Thread(target=feed, args=(delay,))
            feeder.start()
            try:
                assert wait_for(lambda: lost_posts["left"] == 0, 90), worker.text()[-3000:]
                assert wait_for(lambda: lost["id"] in ralph.stored_ids(), 30), worker.text()
            finally:
                stop.set()
                feeder.join()
        assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
        assert _dead(r) == [], worker.text()[-3000:]
        stored = ralph.stored_ids()
        for statement in [stored_late, lost, *others]:
            assert stored.count(statement["id"]) == 1, statement["id"]
        assert "already stored with the same content" in worker.text()
    finally:
        proxy.stop()


def test_a_split_counts_its_time_from_the_take_not_from_its_start(
    redis_srv, ralph, make_config, start_worker
):
    """The split's deadline counted from when the batch reached the pool process: a batch
    that had waited there (behind a slow one) could still split for the whole budget, and
    its messages outlive the visibility timeout (another consumer then takes them). It
    counts from when its messages were taken."""
    blocker = video_statement("played", 1)
    bad = [video_statement("played", n) for n in range(10, 26)]
    bad_ids = {s["id"] for s in bad}

    def respond(req):
        ids = _posted_ids(req) if req.method == "POST" else set()
        if blocker["id"] in ids:
            time.sleep(7)  # holds the only pool process, answered within the read timeout
            return None
        if ids and ids <= bad_ids:
            time.sleep(0.5)
            return 400, JSON, b'{"detail": "rejected"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    # budget: 30 - 0.2 (flush) - 2 x (1 + 8) = 11.8 s; a full split of the 16 rejected
    # statements (31 POSTs of 0.5 s) would take 15.5 s
    config = make_config(
        proxy.url,
        XAPI_WORKER_BATCH_SIZE=16,
        XAPI_WORKER_READ_TIMEOUT=8,
        XAPI_WORKER_VISIBILITY_TIMEOUT=30,
    )
    try:
        worker = start_worker(config)
        with pod_producer(redis_srv.url()) as delay:
            delay(blocker)
            assert wait_for(lambda: len(proxy.requests) >= 1, 20), worker.text()
            sent = time.monotonic()
            for statement in bad:
                delay(statement)
        assert wait_for(lambda: "split stopped: its time is up" in worker.text(), 40), (
            worker.text()[-3000:]
        )
        stopped = time.monotonic() - sent
        # from the take: 11.8 s (+ the last POST); from the split's start, 7 s later: 19.3 s
        assert stopped < 15, (stopped, worker.text()[-3000:])
    finally:
        proxy.stop()


def test_a_retried_batch_has_its_split_budget_less_its_countdown_only_once(
    redis_srv, ralph, make_config, start_worker
):
    """The split's budget kept a retry delay aside, and its deadline counted from the take,
    which for a retry includes its countdown: the delay counted twice, and a retried batch
    had 3.8 s where 13.8 s were left. Counted from the take, the budget keeps no delay aside."""
    bad = [video_statement("played", n) for n in range(40, 48)]
    bad_ids = {s["id"] for s in bad}
    first = threading.Event()

    def respond(req):
        ids = _posted_ids(req) if req.method == "POST" else set()
        if ids and ids <= bad_ids and not first.is_set():
            first.set()
            return 503, {"Retry-After": "10"}, b"busy"
        if ids and ids <= bad_ids:
            time.sleep(0.5)
            return 400, JSON, b'{"detail": "rejected"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    # budget from the take: 30 - 0.2 (flush) - 2 x (1 + 2) = 23.8 s, 10 s of it waited for
    # the countdown; the split of the 8 (15 POSTs of 0.5 s) takes 7.5 s. Before: 3.8 s left.
    config = make_config(
        proxy.url,
        XAPI_WORKER_BATCH_SIZE=8,
        XAPI_WORKER_READ_TIMEOUT=2,
        XAPI_WORKER_RETRY_MAX_SECONDS=10,
        XAPI_WORKER_VISIBILITY_TIMEOUT=30,
    )
    try:
        worker = start_worker(config)
        with pod_producer(redis_srv.url()) as delay:
            for statement in bad:
                delay(statement)
        r = redis_srv.client()
        assert wait_for(lambda: r.llen("xapi.dead_letters") == len(bad), 60), worker.text()[-3000:]
        assert "split stopped" not in worker.text(), worker.text()[-3000:]
    finally:
        proxy.stop()


def test_a_far_retry_after_then_a_broken_backend_through_the_spool_lose_nothing(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """Issue #33's scenario, at the worker's level: the LRS asks for a wait far in the future
    (a date 400 days ahead: held for the one-hour cap), so every statement is parked in the
    spool; the worker restarts and wakes them, and drains them through a balancer whose
    every other POST goes to a broken backend (503). Every valid statement is stored once,
    none dead-lettered; every invalid one is dead-lettered with the LRS's refusal."""
    far = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400), usegmt=True
    )
    mode = {"far": True, "posts": 0}

    def respond(req):
        if req.method != "POST":
            return None
        if mode["far"]:
            return 503, {**JSON, "Retry-After": far}, b'{"detail": "maintenance"}'
        mode["posts"] += 1
        if mode["posts"] % 2:
            return 503, JSON, b'{"detail": "the broken backend"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    config = make_config(
        proxy.url,
        XAPI_WORKER_SPOOL_DIR=spool_dir,
        XAPI_WORKER_SPOOL_AFTER=1,
        XAPI_WORKER_BATCH_SIZE=20,
    )
    node = f"far@{socket.gethostname()}"
    valid = [video_statement("played", n) for n in range(200)]
    bad = [invalid(video_statement("played", 1000 + n), n) for n in range(4)]

    def depth() -> int:
        spool = Spool(spool_dir, node)
        try:
            return spool.stats().depth
        finally:
            spool.close()

    try:
        worker = start_worker(config, name="far")
        with pod_producer(redis_srv.url()) as delay:
            for n, statement in enumerate(valid):
                delay(statement)
                if n % 50 == 25:
                    delay(bad[n // 50])
        r = redis_srv.client()
        total = len(valid) + len(bad)
        assert wait_for(lambda: depth() == total, 60), worker.text()[-3000:]
        assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
        assert "Retry-After" in worker.text()
        worker.stop()
        mode["far"] = False
        worker = start_worker(config, name="far")  # wakes the parked rows at start
        wanted = sorted(s["id"] for s in valid)
        assert wait_for(lambda: sorted(ralph.stored_ids()) == wanted, 120), worker.text()[-3000:]
        assert wait_for(lambda: len(_dead(r, spool_dir)) == len(bad), 60), worker.text()[-3000:]
        assert wait_for(lambda: depth() == 0, 30)
        dead = _dead(r, spool_dir)
        assert {d["statement"]["id"] for d in dead} == {s["id"] for s in bad}
        assert all(400 <= d["status"] < 500 for d in dead), [d["reason"] for d in dead]
        assert mode["posts"] > 10  # the broken backend answered its share
    finally:
        proxy.stop()


def test_a_statement_that_times_out_alone_again_and_again_is_poison_after_the_rule(ralph):
    """A statement that makes the LRS time out (here: its gateway answers 504, the same
    "maybe stored" path as a read timeout, without a clock in the test) was never poison,
    only aged out: retried for the maximum age (7 days), each retry dragging its batch
    through a read timeout and a split (review of the worker, L3). Now a lone timeout after
    which the LRS, asked by id, says it does not hold the statement counts one lone failure,
    as a 5xx twice does: dead-lettered after POISON_AFTER such exchanges while the LRS
    stores others, never on one; a statement stored, and answered too late, is delivered."""
    slow = video_statement("paused", 777)
    late = video_statement("paused", 778)
    late_posts = {"left": 3}

    def lrs(req):
        ids = _posted_ids(req) if req.method == "POST" else set()
        if slow["id"] in ids:  # its upstream timed out: not stored
            return 504, {"Content-Type": "text/html"}, b"<html>504 Gateway Time-out</html>"
        if late["id"] in ids and late_posts["left"] > 0:
            late_posts["left"] -= 1
            _forward(ralph.port, req)  # stored, the gateway gave up waiting
            return 504, {"Content-Type": "text/html"}, b"<html>504 Gateway Time-out</html>"
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=lrs).start()
    settings = settings_from_mapping(
        {
            "XAPI_LRS_URL": proxy.url,
            "XAPI_LRS_LOGIN": LRS_USER,
            "XAPI_LRS_PWD": LRS_PASSWORD,
            "XAPI_CELERY_BROKER_URL": "redis://127.0.0.1:1/6",
        }
    )
    lrs_client = LRSClient(settings)
    good: list[dict] = []
    pending = [Item("slow", slow, attempt=3), Item("late", late, attempt=3)]
    dead: list[Result] = []
    rounds = 0
    try:
        while pending and rounds < POISON_AFTER + 5:
            rounds += 1
            fresh = [video_statement("played", 1000 + len(good) + n) for n in range(2)]
            good.extend(fresh)
            batch = pending + [Item(s["id"], s, attempt=3) for s in fresh]
            results = deliver(batch, lrs_client.post_statements, fetch=lrs_client.get_statement)
            pending = []
            for res in results:
                if res.verdict is Verdict.DEAD:
                    dead.append(res)
                elif res.verdict is Verdict.RETRY:
                    res.item.attempt += 1
                    pending.append(res.item)
            if rounds == 1:
                assert not dead
                assert [i.lone_failures for i in pending if i.key == "slow"] == [1]
    finally:
        proxy.stop()
    assert [r.item.key for r in dead] == ["slow"], [(r.item.key, r.reason) for r in dead]
    assert rounds == POISON_AFTER
    assert "does not hold it" in dead[0].reason, dead[0].reason
    assert not pending
    stored = ralph.stored_ids()
    assert sorted(stored) == sorted(s["id"] for s in [late, *good])  # each once


def test_a_statement_behind_a_slow_lrs_is_poison_only_after_lone_timeouts_proved_absent(ralph):
    """The same rule through a real read timeout (review of the worker, L3; issue #33, item
    2): the LRS does not answer in time whenever the batch holds this statement, and stores
    the others. Each exchange times out, splits, times out alone, and the LRS, asked by id,
    says it does not hold it: one lone failure per exchange, never a dead letter on one, a
    dead letter after ``poison_after`` of them (a smaller number than POISON_AFTER, whose
    count the test above proves: each exchange here waits out the read timeout twice)."""
    slow = video_statement("paused", 779)
    poison_after = 3

    def lrs(req):
        if req.method == "POST" and slow["id"] in _posted_ids(req):
            time.sleep(3.0)  # past the worker's read timeout; never stored
            return 503, JSON, b"{}"
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=lrs).start()
    settings = settings_from_mapping(
        {
            "XAPI_LRS_URL": proxy.url,
            "XAPI_LRS_LOGIN": LRS_USER,
            "XAPI_LRS_PWD": LRS_PASSWORD,
            "XAPI_CELERY_BROKER_URL": "redis://127.0.0.1:1/6",
            "XAPI_WORKER_READ_TIMEOUT": "2",
        }
    )
    lrs_client = LRSClient(settings)
    lrs_client.get_statement(slow["id"])  # Ralph's first read is slow: not the one measured
    good: list[dict] = []
    pending = [Item("slow", slow, attempt=3)]
    dead: list[Result] = []
    counts: list[int] = []
    try:
        while pending and len(counts) < poison_after + 2:
            fresh = [video_statement("played", 2000 + len(good) + n) for n in range(2)]
            good.extend(fresh)
            batch = pending + [Item(s["id"], s, attempt=3) for s in fresh]
            results = deliver(
                batch,
                lrs_client.post_statements,
                fetch=lrs_client.get_statement,
                poison_after=poison_after,
            )
            pending = []
            for res in results:
                if res.verdict is Verdict.DEAD:
                    dead.append(res)
                elif res.verdict is Verdict.RETRY:
                    assert res.answer.timed_out and res.absent, res.answer
                    res.item.attempt += 1
                    pending.append(res.item)
            counts.append(_lone_failures_of_slow(results))
    finally:
        proxy.stop()
    assert counts == list(range(1, poison_after + 1)), counts
    assert [r.item.key for r in dead] == ["slow"], [(r.item.key, r.reason) for r in dead]
    assert "does not hold it" in dead[0].reason and "timed out" in dead[0].reason.lower()
    assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in good)  # each once


def _lone_failures_of_slow(results: list[Result]) -> int:
    (slow,) = [r.item for r in results if r.item.key == "slow"]
    return slow.lone_failures


def test_a_signed_header_set_put_on_other_messages_holds_nothing(
    redis_srv, ralph, make_config, start_worker
):
    """The signature of a worker's retry covered its task id and counts, not its ``eta`` nor
    its body: whoever read one signed retry (the monitoring user reads the queue,
    `xapi.unreadable` keeps whole records) and holds the producer's password could queue
    copies of its headers on other messages with a far ``eta``, kept as a worker's: they
    held every prefetch slot (review of the worker, L8). The signature now covers the
    ``eta`` and the body's digest: the copies are new messages, delivered at once."""
    from test_headers import _envelope

    r = redis_srv.client()
    proxy = Proxy(upstream_port=ralph.port, force_status=503).start()
    first = start_worker(
        make_config(proxy.url, XAPI_WORKER_RETRY_BASE_SECONDS=5, XAPI_WORKER_RETRY_MAX_SECONDS=5),
        name="first",
    )
    with pod_producer(redis_srv.url()) as delay:
        delay(video_statement("played", 1))

    def signed_retry():  # queued, or already taken back (held until its eta)
        records = [json.loads(raw) for raw in r.lrange("xapi", 0, -1)]
        records += [json.loads(raw)[0] for raw in r.hvals("unacked")]
        for message in records:
            if MAC in message["headers"] and message["headers"].get("eta"):
                return message
        return None

    assert wait_for(lambda: signed_retry() is not None, 30), first.text()[-3000:]
    retry = signed_retry()
    first.kill()
    r.delete("xapi", "unacked", "unacked_index")  # the original: not what is measured
    proxy.stop()
    headers = dict(retry["headers"], eta="2999-01-01T00:00:00+00:00")
    copies = [video_statement("played", 100 + n) for n in range(8)]
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    r.lpush("xapi", *[_envelope([[s], {}, embed], headers) for s in copies])
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=2), name="second")
    good = [video_statement("played", n) for n in range(10, 13)]
    with pod_producer(redis_srv.url()) as delay:
        for statement in good:
            delay(statement)
    want = {s["id"] for s in good + copies}
    assert wait_for(lambda: want <= set(ralph.stored_ids()), 40), worker.text()[-3000:]
    assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
