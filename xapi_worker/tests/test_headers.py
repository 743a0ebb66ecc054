"""Headers come with the message, and any message can arrive (the producer's ACL user writes
them): counts and times a header carries are bounded before they reach the spool, a dead
letter or a re-publish, so that one message can never hold its batch."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import pod_producer, wait_for
from xapi_testsupport.statements import video_statement
from xapi_worker.bookkeeping import COUNT_MAX as HEADER_COUNT_MAX
from xapi_worker.bookkeeping import count as _int
from xapi_worker.consumer import NOT_PROTOCOL_2, not_protocol_2
from xapi_worker.delivery import iso, parse_iso
from xapi_worker.settings import TASK_NAME
from xapi_worker.spool import Entry, Spool, SpoolError


@pytest.mark.parametrize("value", [10**30, str(10**30), 2**63])
def test_a_huge_count_is_bounded(value: object) -> None:
    assert _int(value, 1) == HEADER_COUNT_MAX
    assert _int(value, 0, minimum=0) == HEADER_COUNT_MAX


@pytest.mark.parametrize(
    "value",
    ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "1969-12-31T00:00:00+00:00"],
)
def test_a_time_iso_cannot_write_back_is_no_time(value: str) -> None:
    assert parse_iso(value) is None


def test_a_plain_time_reads_back() -> None:
    now = round(time.time(), 3)
    assert parse_iso(iso(now)) == pytest.approx(now)


def test_a_count_sqlite_cannot_hold_is_a_spool_error(tmp_path) -> None:
    """Nothing written, and the caller's error is the spool's (not an OverflowError that
    would put the whole batch back again and again)."""
    spool = Spool(tmp_path, "n@host")
    entry = Entry({"id": "x"}, "task", 10**30, time.time(), time.time())
    with pytest.raises(SpoolError):
        spool.add([entry])
    assert spool.stats().depth == 0


# --- messages that are not Celery's protocol 2 (review of the worker, H1 and L5) -------------
def _envelope(body: Any, headers: dict[str, Any]) -> bytes:
    """A message as a producer with the broker's producer password can queue it."""
    task_id = body.get("id", str(uuid.uuid4())) if isinstance(body, dict) else str(uuid.uuid4())
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": "xapi"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


def test_a_body_eta_of_protocol_1_or_hybrid_holds_nothing_and_loses_nothing(
    redis_srv, ralph, make_config, start_worker
):
    """A producer's ``eta`` in the message *body* (protocol 1: no ``task`` header; or a
    "hybrid" body, a dict holding ``args``) was obeyed by celery-batches: prefetch-many such
    messages (8 here, batch size 2) held every slot, 0 of 3 of Pod's statements stored in
    20 s; and an ``eta`` it could not convert was rejected into nothing (in no list, not at
    the LRS). Pod only sends protocol 2: anything else is dead-lettered with its reason."""
    r = redis_srv.client()
    far = "2099-01-01T00:00:00+00:00"
    odd = {}  # task id -> its statement
    messages = []
    for n in range(8):
        task_id = str(uuid.uuid4())
        statement = video_statement("played", 100 + n)
        odd[task_id] = statement
        body = {"task": TASK_NAME, "id": task_id, "args": [statement], "kwargs": {}, "eta": far}
        messages.append(_envelope(body, {}))
    task_id = str(uuid.uuid4())
    odd[task_id] = video_statement("played", 200)
    hybrid = {"args": [odd[task_id]], "kwargs": {}, "eta": far}
    messages.append(_envelope(hybrid, {"task": TASK_NAME, "id": task_id}))
    task_id = str(uuid.uuid4())
    odd[task_id] = video_statement("played", 201)
    unconvertible = {
        "task": TASK_NAME,
        "id": task_id,
        "args": [odd[task_id]],
        "kwargs": {},
        "eta": "9999-12-31T23:59:59-14:00",
    }
    messages.append(_envelope(unconvertible, {}))
    r.lpush("xapi", *messages)
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=2))
    good = [video_statement("played", n) for n in range(3)]
    with pod_producer(redis_srv.url()) as delay:
        for statement in good:
            delay(statement)
    want = sorted(s["id"] for s in good)
    assert wait_for(lambda: sorted(ralph.stored_ids()) == want, 30), worker.text()[-3000:]
    dead = lambda: [json.loads(e) for e in r.lrange("xapi.dead_letters", 0, -1)]  # noqa: E731
    assert wait_for(lambda: len(dead()) == len(odd), 30), worker.text()[-3000:]
    found = set()
    for entry in dead():
        assert entry["reason"].startswith(NOT_PROTOCOL_2), entry["reason"]
        body = entry["statement"]["message_body"]
        found |= {t for t, s in odd.items() if s["id"] in body}
    assert found == set(odd)
    assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
    assert r.llen("xapi.unreadable") == 0
    assert sorted(ralph.stored_ids()) == want


class _Message:
    def __init__(self, headers: object, payload: object) -> None:
        self.headers, self.payload = headers, payload


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.text(), JSON), eta=JSON, task_header=st.booleans())
def test_any_dict_body_is_not_protocol_2(body: dict, eta: object, task_header: bool) -> None:
    """Whatever a dict body holds (an ``eta`` of any JSON value among it), with a task named
    in its headers or in itself, the message is not protocol 2: never handed to Celery."""
    body = {**body, "task": TASK_NAME, "eta": eta}
    headers = {"task": TASK_NAME, "id": "t"} if task_header else {"id": "t"}
    assert not_protocol_2(_Message(headers, body)) is not None


@settings(max_examples=300, deadline=None)
@given(args=st.lists(JSON, max_size=3), kwargs=st.dictionaries(st.text(), JSON, max_size=3))
def test_a_protocol_2_body_is_one(args: list, kwargs: dict) -> None:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    headers = {"task": TASK_NAME, "id": "t"}
    assert not_protocol_2(_Message(headers, [args, kwargs, embed])) is None
