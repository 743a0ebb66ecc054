"""End to end: a producer built like Pod's, redis-server, this package's worker, Ralph."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from support import (
    LRS_PASSWORD,
    Proxy,
    pod_producer,
    wait_for,
    worker_env,
)
from xapi_testsupport.statements import VERBS, video_statement
from xapi_worker.delivery import Item, Verdict, comparable, deliver, same_id
from xapi_worker.lrs import LRSClient
from xapi_worker.settings import load_settings


def test_seven_video_verbs_from_pod_producer(redis_srv, ralph, make_config, start_worker):
    worker = start_worker(make_config(ralph.url))
    sent = []
    with pod_producer(redis_srv.url()) as delay:
        for n, verb in enumerate(VERBS):
            for with_id in (True, False):  # Pod sets ids; a statement without one gets one
                statement = video_statement(verb, n, with_id=with_id)
                sent.append(statement)
                delay(statement)
    assert wait_for(lambda: len(ralph.stored()) == len(sent), 30), worker.text()
    stored = ralph.stored()
    assert Counter(s["verb"]["id"] for s in stored) == Counter({v: 2 for v in VERBS.values()})
    given = {s["id"] for s in sent if "id" in s}
    assert given <= {s["id"] for s in stored}
    assert len({s["id"] for s in stored}) == len(sent)
    assert wait_for(lambda: "delivered batch:" in worker.text(), 10)
    assert LRS_PASSWORD not in worker.text()


def test_version_header_and_auth_on_every_request(redis_srv, ralph, make_config, start_worker):
    proxy = Proxy(upstream_port=ralph.port).start()
    try:
        start_worker(make_config(proxy.url, XAPI_WORKER_BATCH_SIZE=3))
        with pod_producer(redis_srv.url()) as delay:
            for n in range(7):
                delay(video_statement("played", n))
        assert wait_for(lambda: len(ralph.stored()) == 7, 30)
        posts = [r for r in proxy.requests if r.method == "POST"]
        assert posts
        for req in posts:
            assert req.headers.get("X-Experience-API-Version") == "1.0.3"
            assert req.headers.get("Authorization", "").startswith("Basic ")
            assert isinstance(json.loads(req.body), list)  # batches are JSON arrays
        assert max(len(json.loads(r.body)) for r in posts) <= 3
    finally:
        proxy.stop()


def test_invalid_statement_in_batch_is_isolated(redis_srv, ralph, make_config, start_worker):
    good = [video_statement("played", n) for n in range(9)]
    bad = video_statement("paused", 99)
    del bad["verb"]
    with pod_producer(redis_srv.url()) as delay:
        for statement in [*good[:4], bad, *good[4:]]:
            delay(statement)
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=10))
    r = redis_srv.client()
    assert wait_for(lambda: r.llen("xapi.dead_letters") == 1, 30), worker.text()
    assert wait_for(lambda: len(ralph.stored()) == 9, 10)
    assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in good)
    entry = json.loads(r.lindex("xapi.dead_letters", 0))
    assert entry["statement"]["id"] == bad["id"]
    assert entry["status"] in (400, 422)
    assert entry["response"]
    assert entry["task_id"] and entry["time"]
    assert entry["reason"] == f"rejected by the LRS (HTTP {entry['status']})"
    assert wait_for(lambda: "splitting" in worker.text() and "dead letter" in worker.text(), 10)


def test_pickle_message_is_not_executed(redis_srv, ralph, make_config, start_worker):
    from celery import Celery

    evil = Celery("evil", broker=redis_srv.url())
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    evil.conf.task_routes = {"pod.xapi.xapi_tasks.*": {"queue": "xapi"}}
    pickled = video_statement("played", 1)
    evil.send_task("pod.xapi.xapi_tasks.send_xapi_statement_task", args=[pickled])
    evil.close()
    worker = start_worker(make_config(ralph.url))
    proper = video_statement("played", 2)
    with pod_producer(redis_srv.url()) as delay:
        delay(proper)
    assert wait_for(lambda: proper["id"] in ralph.stored_ids(), 30), worker.text()
    assert pickled["id"] not in ralph.stored_ids()
    assert wait_for(lambda: "pickle" in worker.text().lower(), 10)


def test_last_delivery_recorded_once_per_accepted_batch(
    redis_srv, ralph, make_config, start_worker
):
    r = redis_srv.client()
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=5))
    assert r.get("xapi.last_delivery") is None  # nothing delivered yet
    before = time.time()
    with pod_producer(redis_srv.url()) as delay:
        for n in range(5):
            delay(video_statement("played", n))
    assert wait_for(lambda: len(ralph.stored()) == 5 and r.exists("xapi.last_delivery"), 30)
    first = float(r.get("xapi.last_delivery"))
    assert before <= first <= time.time()
    # a refused statement alone is no delivery: the key stays
    bad = video_statement("paused", 9)
    del bad["verb"]
    with pod_producer(redis_srv.url()) as delay:
        delay(bad)
    assert wait_for(lambda: r.llen("xapi.dead_letters") == 1, 30), worker.text()
    assert float(r.get("xapi.last_delivery")) == first
    with pod_producer(redis_srv.url()) as delay:
        delay(video_statement("played", 7))
    assert wait_for(lambda: float(r.get("xapi.last_delivery")) > first, 30), worker.text()


# --- the read-back by id (review of the worker, L6) ------------------------------------------
def test_a_statement_sent_with_an_upper_case_id_is_read_back_as_stored(ralph, make_config):
    """Ralph stores a UUID in lower case: after a 409 (or a lone timeout), reading back a
    statement sent with an upper-case id said "not stored", and it was retried for the
    maximum age (7 days of 409s), then dead-lettered although the LRS held it."""
    statement = video_statement("played", 4242)
    statement["id"] = statement["id"].upper()
    client = LRSClient(load_settings(worker_env(make_config(ralph.url))))
    assert client.post_statements([statement]).status == 200
    answer, stored = client.get_statement(statement["id"])
    assert answer.status == 200 and stored is not None
    [result] = deliver(
        [Item("t", statement, attempt=1)], client.post_statements, fetch=client.get_statement
    )
    assert result.verdict in (Verdict.DUPLICATE, Verdict.DELIVERED), result
    assert ralph.stored_ids().count(statement["id"].lower()) == 1


@given(st.uuids(), st.lists(st.booleans(), min_size=36, max_size=36))
def test_a_uuid_is_the_same_id_whatever_the_case_of_its_letters(value, upper) -> None:
    text = str(value)
    mixed = "".join(c.upper() if u else c for c, u in zip(text, upper, strict=True))
    assert same_id(text, mixed) and same_id(mixed, text)
    assert comparable({"id": mixed, "verb": 1}) == comparable({"id": text, "verb": 1})
    assert not same_id(text, str(uuid.uuid4()))


@given(st.text(), st.text())
def test_ids_that_are_no_uuid_compare_as_they_are(a, b) -> None:
    assert same_id(a, a)
    assert same_id(a, a.upper()) == (a == a.upper())
    assert same_id(a, b) == (a == b)
