"""Pipeline counters in the broker (hash ``xapi.metrics``) and the JSON event lines of logger
``xapi_worker.events``, on a real redis-server, Ralph and Celery workers."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from support import LRS_PASSWORD, Proxy, free_port, pod_producer, wait_for
from xapi_testsupport.statements import agent, statement
from xapi_worker.names import DELIVERED, RETRIED
from xapi_worker.settings import settings_from_mapping

from xapi_worker import metrics as m

KEY = "xapi.metrics"
REDIS_USER = "xapi-metrics-test"
REDIS_PASSWORD = "r3dis-Broker-pw"
LEARNER = agent("Alice Learner", "mailto:alice.learner@example.org")
BATCH_BOUNDS = ["1", "5", "10", "25", "50", "100", "250", "500", "+Inf"]
LATENCY_BOUNDS = ["0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"]


def _good(n: int) -> list[dict[str, Any]]:
    return [statement("played", actor=LEARNER) for _ in range(n)]


def _bad() -> dict[str, Any]:
    return statement(None, actor=LEARNER)  # no verb: the LRS refuses it


def _produce(url: str, statements: list[dict[str, Any]]) -> None:
    with pod_producer(url) as delay:
        for s in statements:
            delay(s)


def _hash(redis_srv: Any) -> dict[str, float]:
    raw = redis_srv.client().hgetall(KEY)
    return {k.decode(): float(v) for k, v in raw.items()}


def _field(redis_srv: Any, name: str) -> float:
    return _hash(redis_srv).get(name, 0.0)


def _user_url(redis_srv: Any, rules: str, name: str = REDIS_USER) -> str:
    """An ACL user with a password on the test's Redis, and the worker's URL for it."""
    redis_srv.client().execute_command(
        "ACL", "SETUSER", name, "reset", "on", f">{REDIS_PASSWORD}", *rules.split()
    )
    return f"redis://{name}:{REDIS_PASSWORD}@127.0.0.1:{redis_srv.port}/6"


def _events(text: str) -> list[dict[str, Any]]:
    """Every JSON event line of a worker's log (after Celery's ``[time: LEVEL/process]``)."""
    out = []
    for line in text.splitlines():
        _, sep, message = line.partition("] ")
        if sep and message.startswith('{"'):
            out.append(json.loads(message))
    return out


def _check_histogram(h: dict[str, float], name: str, bounds: list[str]) -> None:
    buckets = [h.get(f"{name}_bucket:{b}", 0.0) for b in bounds]
    assert buckets == sorted(buckets), f"{name} buckets are not cumulative: {buckets}"
    assert buckets[-1] == h[f"{name}_count"] > 0


# --- the module alone ----------------------------------------------------------------------
def _settings(url: str) -> Any:
    return settings_from_mapping(
        {
            "XAPI_LRS_URL": "http://127.0.0.1:9/xAPI/statements/",
            "XAPI_LRS_LOGIN": "u",
            "XAPI_LRS_PWD": "p",
            "XAPI_CELERY_BROKER_URL": url,
        }
    )


def test_buckets_are_cumulative_and_sent_in_one_pipeline(redis_srv):
    rec = m.Metrics(_settings(redis_srv.url()))
    rec.observe_post(30, 200, 0.3)
    rec.observe_post(1, None, 12.0)
    rec.count(DELIVERED, 30)

    def one_by_one(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a command sent on its own, not in the pipeline")

    rec.client.execute_command = one_by_one  # a pipeline is another object: unaffected
    assert rec.flush()
    h = _hash(redis_srv)
    assert [h[f"batch_size_bucket:{b}"] for b in BATCH_BOUNDS] == [1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert [h.get(f"lrs_latency_seconds_bucket:{b}", 0) for b in LATENCY_BOUNDS] == [
        0,
        0,
        0,
        1,
        1,
        1,
        1,
        1,
        2,
    ]
    assert h["batch_size_sum"] == 31 and h["batch_size_count"] == 2
    assert h["lrs_latency_seconds_sum"] == pytest.approx(12.3)
    assert h["lrs_responses:200"] == 1 and h["lrs_responses:error"] == 1
    assert h["delivered"] == 30
    assert rec.pending == {}


def test_unreachable_broker_keeps_counts_and_warns_once(redis_srv, caplog, monkeypatch):
    rec = m.Metrics(_settings(f"redis://127.0.0.1:{free_port()}/6"))
    caplog.set_level(logging.WARNING, logger="xapi_worker.metrics")
    rec.count(DELIVERED, 3)
    started = time.monotonic()
    assert not rec.flush()
    assert time.monotonic() - started < 2
    rec.count(DELIVERED, 2)
    assert not rec.flush()  # not even tried: within RETRY_AFTER_SECONDS
    monkeypatch.setattr(m, "RETRY_AFTER_SECONDS", 0.0)
    rec._next_try = 0.0
    assert not rec.flush()  # tried again, refused again: no second warning within a minute
    assert rec.pending == {"delivered": 5}
    assert len([r for r in caplog.records if "cannot record metrics" in r.getMessage()]) == 1
    rec._settings = _settings(redis_srv.url())  # the broker is back
    rec._client = None
    assert rec.flush()
    assert _field(redis_srv, "delivered") == 5


def test_a_refused_increment_inside_exec_does_not_count_the_others_again(redis_srv, monkeypatch):
    """Redis applies the other commands of an EXEC in which one fails (a field that is not
    an integer): the whole batch's increments used to be kept and sent again, so 3 batches
    of 100 gave delivered=600. Now only the refused increment is dropped."""
    monkeypatch.setattr(m, "RETRY_AFTER_SECONDS", 0.0)
    redis_srv.client().hset(KEY, "retried", "not a number")
    rec = m.Metrics(_settings(redis_srv.url()))
    for _ in range(3):
        rec.count(DELIVERED, 100)
        rec.count(RETRIED, 1)
        rec.observe_post(100, 200, 0.1)
        rec.flush()
    h = redis_srv.client().hgetall(KEY)
    assert int(h[b"delivered"]) == 300
    assert int(h[b"batch_size_count"]) == 3 and int(h[b"lrs_responses:200"]) == 3
    assert h[b"retried"] == b"not a number"
    assert rec.pending == {}


# --- a worker ----------------------------------------------------------------------------------
def test_counters_and_events_of_deliveries_and_dead_letters(
    redis_srv, ralph, make_config, start_worker
):
    proxy = Proxy(upstream_port=ralph.port).start()
    try:
        url = _user_url(redis_srv, "~* &* +@all")
        worker = start_worker(
            make_config(proxy.url, XAPI_CELERY_BROKER_URL=url, XAPI_WORKER_BATCH_SIZE=20)
        )
        good = _good(57)
        _produce(redis_srv.url(), good)
        assert wait_for(lambda: _field(redis_srv, "delivered") == 57, 30), worker.text()
        assert len(ralph.stored()) == 57
        posts = [r for r in proxy.requests if r.method == "POST"]
        h = _hash(redis_srv)
        assert h["lrs_responses:200"] == len(posts) == h["batch_size_count"]
        assert sum(len(json.loads(r.body)) for r in posts) == h["batch_size_sum"] == 57
        assert h["lrs_latency_seconds_count"] == len(posts)
        assert 0 < h["lrs_latency_seconds_sum"] < 5 * len(posts)
        _check_histogram(h, "batch_size", BATCH_BOUNDS)
        _check_histogram(h, "lrs_latency_seconds", LATENCY_BOUNDS)
        assert h.get("retried", 0) == h.get("dead_lettered", 0) == 0

        # Two refused statements among good ones: split, dead-lettered, counted.
        bad = [_bad(), _bad()]
        more = _good(6)
        _produce(redis_srv.url(), [more[0], bad[0], *more[1:4], bad[1], *more[4:]])
        r = redis_srv.client()
        assert wait_for(lambda: _field(redis_srv, "dead_lettered") == 2, 30), worker.text()
        assert wait_for(lambda: _field(redis_srv, "delivered") == 63, 10)
        status = json.loads(r.lindex("xapi.dead_letters", 0))["status"]
        h = _hash(redis_srv)
        posts = [r for r in proxy.requests if r.method == "POST"]
        answers = {k: v for k, v in h.items() if k.startswith("lrs_responses:")}
        assert answers.get(f"lrs_responses:{status}", 0) >= 2
        assert sum(answers.values()) == len(posts) == h["batch_size_count"]
        _check_histogram(h, "batch_size", BATCH_BOUNDS)

        # The events say the same, and hold no secret and no personal data.
        text = worker.text()
        events = _events(text)
        delivered = [e for e in events if e["event"] == "delivered"]
        assert sum(e["count"] for e in delivered) == 63
        assert {e["lrs_status"] for e in delivered} == {200}
        assert all(e["node"] and e["batch"] >= e["count"] for e in delivered)
        dead = [e for e in events if e["event"] == "dead_letter"]
        assert sorted(e["statement_id"] for e in dead) == sorted(s["id"] for s in bad)
        assert {e["lrs_status"] for e in dead} == {status}
        assert all(e["reason"] for e in dead)
        assert LRS_PASSWORD not in text
        assert REDIS_PASSWORD not in text
        for line in text.splitlines():
            if '"event"' in line:
                assert "alice" not in line.lower()
                assert '"verb"' not in line and '"actor"' not in line
    finally:
        proxy.stop()


def test_lrs_stopped_counts_errors_and_retries(redis_srv, ralph, make_config, start_worker):
    ralph.stop()
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=10))
    statements = _good(5)
    _produce(redis_srv.url(), statements)
    assert wait_for(lambda: _field(redis_srv, "lrs_responses:error") >= 2, 20), worker.text()
    assert wait_for(lambda: _field(redis_srv, "retried") >= 10, 10)
    assert _field(redis_srv, "delivered") == 0
    ralph.start()
    assert wait_for(lambda: _field(redis_srv, "delivered") == 5, 30), worker.text()[-3000:]
    assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in statements)
    h = _hash(redis_srv)
    answers = {k: v for k, v in h.items() if k.startswith("lrs_responses:")}
    assert sum(answers.values()) == h["lrs_latency_seconds_count"], h
    assert answers["lrs_responses:200"] >= 1
    assert h.get("dead_lettered", 0) == 0
    retries = [e for e in _events(worker.text()) if e["event"] == "retry"]
    assert retries and all(e["lrs_status"] is None and e["delay_s"] > 0 for e in retries)
    assert sum(e["count"] for e in retries) == h["retried"]
    assert all("Connection" in e["reason"] for e in retries)


def test_broker_refusing_the_counters_loses_no_delivery(
    redis_srv, ralph, make_config, start_worker
):
    url = _user_url(redis_srv, "~* &* +@all -hincrby -hincrbyfloat", name="no-metrics")
    worker = start_worker(
        make_config(ralph.url, XAPI_CELERY_BROKER_URL=url, XAPI_WORKER_BATCH_SIZE=10)
    )
    statements = _good(25)
    _produce(redis_srv.url(), statements[:15])
    assert wait_for(lambda: len(ralph.stored()) == 15, 30), worker.text()
    _produce(redis_srv.url(), statements[15:])
    assert wait_for(lambda: len(ralph.stored()) == 25, 30), worker.text()
    r = redis_srv.client()
    assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in statements)
    assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 10)
    assert r.llen("xapi.dead_letters") == 0
    assert not r.exists(KEY)
    text = worker.text()
    assert text.count("cannot record metrics") == 1, text  # once a minute at most
    assert "NoPermission" in text or "NOPERM" in text
    assert REDIS_PASSWORD not in text
    assert sum(e["count"] for e in _events(text) if e["event"] == "delivered") == 25
