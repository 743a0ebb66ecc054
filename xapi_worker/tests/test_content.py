"""Statement content from anonymous browsers, through the real worker, Redis and Ralph: any
content Pod's producer can queue ends stored or dead-lettered alone, never holding others."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from support import Proxy, disk_dead_letters, pod_producer, wait_for
from xapi_testsupport.statements import video_statement
from xapi_worker.consumer import NESTED_TOO_DEEP
from xapi_worker.content import (
    LONE_SURROGATE,
    MAX_STATEMENT_BYTES,
    NOT_A_NUMBER,
    TOO_DEEP,
    TOO_LARGE,
    problem,
)
from xapi_worker.delivery import STATEMENT_ID_NAMESPACE


def _dead(r: Any, spool_dir: Path | None = None) -> list[dict[str, Any]]:
    """The dead letters in the broker's list and, with the spool on, on the disk."""
    kept = [json.loads(x) for x in r.lrange("xapi.dead_letters", 0, -1)]
    return kept + (disk_dead_letters(spool_dir) if spool_dir is not None else [])


def _nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"a": [value]} if depth % 2 else {"a": value}
    return value


def _hostile() -> dict[str, tuple[dict[str, Any], str]]:
    """Statements Pod's view queues from any visitor, and the reason each is refused."""
    cut_emoji = video_statement("played", 900)
    cut_emoji["verb"]["display"] = {"en-US": "played \ud83c"}  # a string cut inside an emoji
    not_a_number = video_statement("played", 901)
    not_a_number["result"] = {"score": {"raw": float("nan")}}
    deep = video_statement("played", 902)
    deep["result"] = {"extensions": {"http://example.org/deep": _nested(900)}}
    return {
        cut_emoji["id"]: (cut_emoji, LONE_SURROGATE),
        not_a_number["id"]: (not_a_number, NOT_A_NUMBER),
        deep["id"]: (deep, TOO_DEEP),
    }


@pytest.mark.parametrize("spool", [False, True], ids=["live", "spool"])
def test_content_no_lrs_can_store_is_dead_lettered_alone(
    tmp_path: Path, spool, redis_srv, ralph, make_config, start_worker
):
    """A lone surrogate used to make the POST, the spool write and the dead-letter write all
    raise UnicodeEncodeError: its batch went back again and again, and nothing queued after
    it was stored (0 of 20 in 120 s on the lab). A statement nested 900 deep stopped the
    batch being handed to the pool (RecursionError while pickling)."""
    hostile = _hostile()
    good = [video_statement("played", n) for n in range(20)]
    settings: dict[str, Any] = {"XAPI_WORKER_BATCH_SIZE": 10}
    failing = {"on": spool}

    def respond(req):  # with the spool: the LRS fails first, statements go to the spool
        if req.method == "POST" and failing["on"]:
            return 503, {"Content-Type": "application/json"}, b'{"detail":"down"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    spool_dir: Path | None = None
    if spool:
        spool_dir = tmp_path / "spool"
        spool_dir.mkdir(mode=0o700)
        settings.update(XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_SPOOL_AFTER=1)
    try:
        worker = start_worker(make_config(proxy.url, **settings), name="content")
        r = redis_srv.client()
        with pod_producer(redis_srv.url()) as delay:
            for n, statement in enumerate(good):
                delay(statement)
                if n % 7 == 3:
                    for bad, _ in hostile.values():
                        delay(bad)
        if spool:
            assert wait_for(lambda: "spooled" in worker.text(), 30), worker.text()[-3000:]
            failing["on"] = False
        assert wait_for(lambda: len(ralph.stored()) == len(good), 60), worker.text()[-3000:]
        assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in good)
        expected = 3 * len(hostile)
        assert wait_for(lambda: len(_dead(r, spool_dir)) == expected, 30), worker.text()[-3000:]
        for entry in _dead(r, spool_dir):
            statement_id = entry["statement"]["id"]
            assert entry["reason"] == hostile[statement_id][1]
        assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
        assert "UnicodeEncodeError" not in worker.text()
        assert "Traceback" not in worker.text()
    finally:
        proxy.stop()


# --- any content, through the real worker: a property --------------------------------------
SURROGATES = st.characters(codec=None, categories=["Cs"])
ANY_CHAR = st.one_of(st.characters(), SURROGATES, st.sampled_from("\x00\ufeff\u2028\U0001f3ac"))
ANY_TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=40),
)
EDGE_NUMBERS = st.one_of(
    st.sampled_from([0, -0.0, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**300, 1e308, 5e-324]),
    st.integers(-(10**40), 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), EDGE_NUMBERS, ANY_TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(ANY_TEXT, inner, max_size=4)
    ),
    max_leaves=12,
)


class Deep:
    """A value nested ``depth`` levels deep, built at use (a short repr for reports)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"Deep({self.depth})"

    def build(self) -> Any:
        return _nested(self.depth)


class Huge:
    """A string of ``size`` times ``char``, built at use (a short repr for reports)."""

    def __init__(self, char: str, size: int) -> None:
        self.char, self.size = char, size

    def __repr__(self) -> str:
        return f"Huge({self.char!r}, {self.size})"

    def build(self) -> Any:
        return self.char * self.size


ANY_VALUE = st.one_of(
    JSON_VALUES,
    # Nested up to 120 levels, which Ralph takes; from about 200, Ralph answers 500
    # ("Maximum serialization depth exceeded"), a poison whose lone failures take a minute:
    # test_trust covers those. 900 levels, past what the worker can encode, in the example.
    st.integers(1, 120).map(Deep),
    # Around the limit of the consumer's JSON parser (about 950 levels: the body cannot be
    # decoded, Celery acknowledged it into nothing) and of the producer's encoder.
    st.integers(900, 1000).map(Deep),
    # huge strings: 64 to 256 kB of one character, surrogates included (1 MB in the example)
    st.builds(Huge, ANY_CHAR, st.integers(2**16, 2**18)),
)
#: where a browser's value lands in a statement Pod's player builds
PLACES = st.sampled_from(
    ["extension", "display", "actor", "verb", "object", "id", "statement", "argument"]
)


def _hostile_message(place: str, value: Any, n: int) -> tuple[Any, dict[str, Any] | None]:
    """The task argument Pod's view would queue, and its statement when it is one."""
    if isinstance(value, Deep | Huge):
        value = value.build()
    statement = video_statement("played", 10_000 + n)
    if place == "extension":
        statement["result"] = {"extensions": {"http://example.org/any": value}}
    elif place == "display":
        statement["verb"]["display"] = {"en-US": value}
    elif place in ("actor", "verb", "object", "id"):
        statement[place] = value
    elif place == "statement":
        statement = value if isinstance(value, dict) else {"value": value}
    else:  # not a statement at all: the task's one argument is any JSON value
        return value, None
    return statement, statement


def _queued(delay: Any, argument: Any) -> str:
    """Queue ``argument`` from a thread of its own: the producer's encoder then has the whole
    stack (as Pod's view has, a few dozen frames deep), not what pytest and Hypothesis left."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["id"] = delay(argument).id
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return str(out["id"])


@settings(
    max_examples=10,
    deadline=None,
    database=None,
    # no shrinking: each example takes seconds of a real worker; a failure is reported as found
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    valid=st.integers(0, 25),
    hostile=st.lists(st.tuples(PLACES, ANY_VALUE), min_size=1, max_size=8),
)
@example(
    valid=5,
    hostile=[
        ("display", "cut \ud83c"),
        ("display", "a\x00b"),
        ("extension", float("nan")),
        ("extension", Deep(900)),
        ("extension", Deep(955)),
        ("extension", Deep(975)),
        ("extension", Huge("x", 2**20)),
        ("extension", 10**300),
        ("statement", [1, "\udfff"]),
        ("argument", "\ud800"),
    ],
)
def test_any_content_ends_stored_once_or_dead_lettered_with_a_reason(
    tmp_path_factory, redis_srv, ralph, make_config, start_worker, valid, hostile
):
    """Whatever a browser puts in a statement, mixed with valid ones: every valid statement
    is stored exactly once, every other one ends stored once or dead-lettered with a reason
    (one no LRS can store always dead-lettered), and nothing stays queued or in flight.
    One worker serves every example (statements of each example are new)."""
    r = redis_srv.client()
    if not hasattr(redis_srv, "property_worker"):
        spool_dir = tmp_path_factory.mktemp("spool")
        spool_dir.chmod(0o700)
        config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_BATCH_SIZE=25)
        redis_srv.property_worker = start_worker(config, name="property")
        redis_srv.property_spool = spool_dir
    worker = redis_srv.property_worker
    spool_dir = redis_srv.property_spool
    good = [video_statement("played", n) for n in range(valid)]
    tracked: dict[str, tuple[str, Any]] = {}  # task id -> (statement id, argument)
    with pod_producer(redis_srv.url()) as delay:
        for n, (place, value) in enumerate(hostile):
            argument, statement = _hostile_message(place, value, n)
            try:
                task_id = _queued(delay, argument)
            except (ValueError, RecursionError):
                continue  # Pod's producer cannot queue it either
            given_id = statement.get("id") if statement is not None else None
            if not (isinstance(given_id, str) and given_id):
                given_id = str(uuid.uuid5(STATEMENT_ID_NAMESPACE, task_id))
            tracked[task_id] = (given_id, argument)
        for statement in good:
            tracked[delay(statement).id] = (statement["id"], statement)

    def settled() -> bool:
        dead_tasks = {e["task_id"] for e in _dead(r, spool_dir)}
        stored = set(ralph.stored_ids())
        return all(t in dead_tasks or sid in stored for t, (sid, _) in tracked.items())

    assert wait_for(settled, 120), worker.text()[-3000:]
    dead = {e["task_id"]: e for e in _dead(r, spool_dir)}
    stored = ralph.stored_ids()
    for task_id, (statement_id, argument) in tracked.items():
        times = stored.count(statement_id)
        if task_id in dead:
            assert times == 0, (statement_id, dead[task_id]["reason"])
            assert dead[task_id]["reason"], dead[task_id]
        else:
            assert times == 1, statement_id
        if problem(argument) is not None:
            assert task_id in dead
    for statement in good:
        assert stored.count(statement["id"]) == 1
    assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
    assert "Traceback" not in worker.text(), worker.text()[-3000:]


# --- messages the consumer cannot read --------------------------------------------------------
def _raw_nested(depth: int) -> str:
    """JSON text of a value nested ``depth`` levels deep, written without recursion."""
    return '{"a":' * depth + '"bottom"' + "}" * depth


def _message_template(redis_srv) -> dict[str, Any]:
    """A message as Pod's producer queues it (taken back off the queue)."""
    r = redis_srv.client()
    with pod_producer(redis_srv.url()) as delay:
        delay(video_statement("played", 99_999))
    raw = r.rpop("xapi")
    return json.loads(raw)


def _variant(
    template: dict[str, Any], body: bytes | str, *, raw_body: bool = False, **headers: Any
) -> tuple[str, bytes]:
    """A copy of ``template`` with a new task id and ``body`` (base64-encoded unless
    ``raw_body``), and its headers updated; returns (task id, the message as queued)."""
    message = json.loads(json.dumps(template))
    task_id = str(uuid.uuid4())
    message["headers"].update(id=task_id, root_id=task_id, **headers)
    message["properties"]["correlation_id"] = task_id
    message["properties"]["delivery_tag"] = str(uuid.uuid4())
    if raw_body:
        message["body"] = body
    else:
        data = body.encode() if isinstance(body, str) else body
        message["body"] = base64.b64encode(data).decode()
    return task_id, json.dumps(message).encode()


EMBED = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'


def test_a_message_the_consumer_cannot_read_is_dead_lettered_with_its_reason(
    redis_srv, ralph, make_config, start_worker
):
    """Celery acknowledged a message whose body its JSON parser could not read (a statement
    nested about 940 levels and more: `on_decode_error`) and rejected into nothing one that
    was not a task of this worker: lost without trace. A body that decodes to something else
    than a task's arguments stayed unacknowledged and came back for ever. Each is now a dead
    letter with its reason; valid statements before and after are stored."""
    r = redis_srv.client()
    template = _message_template(redis_srv)
    statement = video_statement("played", 5)
    deep = {"result": {"extensions": {"http://example.org/deep": "HOLE"}}}
    deep_text = json.dumps({**statement, **deep})
    unreadable: dict[str, tuple[str, ...]] = {}  # task id -> acceptable reasons (prefixes)
    messages: list[bytes] = []
    for depth in (940, 960, 990, 5000, 100_000):
        nested = deep_text.replace('"HOLE"', _raw_nested(depth))
        body = f"[[{nested}], {{}}, {EMBED}]"
        task_id, raw = _variant(template, body)
        unreadable[task_id] = (NESTED_TOO_DEEP, TOO_DEEP)
        messages.append(raw)
    for body, headers, reason in (
        ("42", {}, "not a Celery protocol 2 task message: the body is not"),
        ('{"not": "a task"}', {}, "not a Celery protocol 2 task message: protocol 1 or hybrid"),
        (f"[[{json.dumps(statement)}], {{}}, {EMBED}]", {"task": "pod.other"}, "not this"),
        ("[[1], {}, {}]", {"task": None}, "not this"),
    ):
        task_id, raw = _variant(template, body, **headers)
        unreadable[task_id] = (reason,)
        messages.append(raw)
    nameless = json.loads(_variant(template, "[[1], {}, {}]")[1])
    del nameless["headers"]["task"]
    unreadable[nameless["headers"]["id"]] = ("not a task message",)
    messages.append(json.dumps(nameless).encode())
    pickled = json.loads(_variant(template, "[[], {}, {}]")[1])
    pickled["content-type"] = "application/x-python-serialize"
    unreadable[pickled["headers"]["id"]] = ("invalid task message: ContentDisallowed",)
    messages.append(json.dumps(pickled).encode())
    not_base64 = _variant(template, "%%% not base64 %%%", raw_body=True)[1]
    good = [video_statement("played", n) for n in range(10)]
    with pod_producer(redis_srv.url()) as delay:
        for s in good[:5]:
            delay(s)
        r.lpush("xapi", *messages, not_base64)
        for s in good[5:]:
            delay(s)
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=5))
    assert wait_for(lambda: len(ralph.stored()) == len(good), 60), worker.text()[-3000:]
    assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in good)
    assert wait_for(lambda: len(_dead(r)) == len(unreadable), 30), worker.text()[-3000:]
    for entry in _dead(r):
        assert entry["reason"].startswith(unreadable[entry["task_id"]]), entry["reason"]
        assert isinstance(entry["statement"], dict)
    assert r.llen("xapi.unreadable") == 1  # not a kombu message: the transport's own path
    assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
    assert worker.proc.poll() is None


def test_the_largest_statement_is_counted_in_utf8_bytes():
    """A statement larger than the worker takes is dead-lettered alone (content.problem):
    that bounds what a batch writes to the spool (spool.batch_bytes). Bytes, not characters."""
    room = MAX_STATEMENT_BYTES - len('{"s": ""}')
    assert problem({"s": "a" * room}) is None
    assert problem({"s": "a" * (room + 1)}) == TOO_LARGE
    assert problem({"s": "\u00e9" * (room // 2 + 1)}) == TOO_LARGE  # 2 bytes a character


def test_a_compressed_message_is_set_aside_unread_and_dead_letters_stay_bounded(
    redis_srv, ralph, make_config, start_worker
):
    """Kombu decompressed a message with a ``compression`` header whole, and its dead letter
    copied the whole body, written past maxmemory: 27 KB queued became a 134 MB dead letter.
    Pod never compresses: such a message goes to ``xapi.unreadable`` as it was queued, and
    a dead letter keeps the head of a body (with its length and digest), never all of it."""
    r = redis_srv.client()
    template = _message_template(redis_srv)
    bomb = zlib.compress(b"\x01" * 20_000_000, 9)
    _, compressed = _variant(template, bomb, compression="application/x-gzip")
    big = json.dumps({"not": "a task", "pad": "x" * 1_000_000})
    long_id = json.loads(_variant(template, big)[1])
    long_id["headers"]["id"] = "t" * 10_000
    large = json.dumps(long_id).encode()
    r.lpush("xapi", compressed, large)
    good = [video_statement("played", n) for n in range(3)]
    with pod_producer(redis_srv.url()) as delay:
        for s in good:
            delay(s)
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=5))
    assert wait_for(lambda: len(ralph.stored()) == len(good), 60), worker.text()[-3000:]
    assert wait_for(lambda: len(_dead(r)) == 1, 30), worker.text()[-3000:]
    assert r.lrange("xapi.unreadable", 0, -1) == [compressed]
    [entry] = _dead(r)
    body = entry["statement"]
    assert len(body["message_body"]) == 4096
    assert body["message_bytes"] == len(big)
    assert body["message_sha256"] == hashlib.sha256(big.encode()).hexdigest()
    assert len(entry["task_id"]) == 200
    assert r.execute_command("MEMORY", "USAGE", "xapi.dead_letters") < 64_000
    assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
    assert worker.proc.poll() is None


def test_a_message_that_cannot_be_dead_lettered_is_set_aside_once(
    redis_srv, ralph, make_config, start_worker
):
    """When its dead letter could not be written, an unreadable message was put back at the
    head of the queue: taken again at once, a hot loop (161 turns in 20 s, a traceback each).
    It now goes to ``xapi.unreadable``, once; the valid statements around it are stored."""
    r = redis_srv.client()
    template = _message_template(redis_srv)
    r.set("xapi.dead_letters", "not a list")  # every dead-letter write: WRONGTYPE
    task_id, unreadable = _variant(template, '{"not": "a task"}')
    good = [video_statement("played", n) for n in range(6)]
    with pod_producer(redis_srv.url()) as delay:
        for s in good[:3]:
            delay(s)
        r.lpush("xapi", unreadable)
        for s in good[3:]:
            delay(s)
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=5))
    assert wait_for(lambda: len(ralph.stored()) == len(good), 60), worker.text()[-3000:]
    assert wait_for(lambda: r.llen("xapi.unreadable") == 1, 30), worker.text()[-3000:]
    assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
    [record] = r.lrange("xapi.unreadable", 0, -1)
    assert json.loads(record)[0]["headers"]["id"] == task_id
    assert worker.text().count("nor dead-lettered") == 1, worker.text()[-3000:]
    assert worker.proc.poll() is None


def test_a_producers_eta_or_expires_is_not_obeyed(redis_srv, ralph, make_config, start_worker):
    """A producer's ``eta`` (year 2999) held its messages in the batch's prefetch slots: 0 of
    5 valid statements stored in 40 s; an ``expires`` in the past dropped the statement. Only
    a worker's retry (its ``eta`` signed with its bookkeeping) waits: a producer's ``eta`` and
    any ``expires`` are dropped at the take, and every statement is delivered."""
    r = redis_srv.client()
    template = _message_template(redis_srv)
    held = [video_statement("played", 1000 + n) for n in range(14)]
    messages = []
    for n, statement in enumerate(held):
        body = f"[[{json.dumps(statement)}], {{}}, {EMBED}]"
        when = (
            {"eta": "2999-01-01T00:00:00+00:00"}
            if n < 12
            else {"expires": "2000-01-01T00:00:00+00:00"}
        )
        messages.append(_variant(template, body, **when)[1])
    r.lpush("xapi", *messages)
    good = [video_statement("played", n) for n in range(5)]
    with pod_producer(redis_srv.url()) as delay:
        for s in good:
            delay(s)
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_BATCH_SIZE=5))
    everything = [s["id"] for s in held + good]
    assert wait_for(lambda: len(ralph.stored()) == len(everything), 40), worker.text()[-3000:]
    assert sorted(ralph.stored_ids()) == sorted(everything)
    assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 30)
    assert r.llen("xapi.dead_letters") == 0


def test_the_largest_statement_taken_is_a_setting(
    tmp_path: Path, redis_srv, ralph, make_config, start_worker
):
    """XAPI_WORKER_MAX_STATEMENT_KB: a statement above it is dead-lettered alone, one below is
    stored, on the live path and through the spool; the spool's headroom (a batch of the
    largest) follows it, and its bounds are checked."""
    from support import run_cli
    from xapi_worker.spool import ROW_OVERHEAD_BYTES, Spool

    small = video_statement("played", 1)
    small["result"] = {"extensions": {"https://w3id.org/xapi/video/extensions/pad": "a" * 10_000}}
    large = video_statement("played", 2)
    large["result"] = {"extensions": {"https://w3id.org/xapi/video/extensions/pad": "a" * 20_000}}
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    config = make_config(
        ralph.url,
        XAPI_WORKER_SPOOL_DIR=spool_dir,
        XAPI_WORKER_MAX_STATEMENT_KB=16,
        XAPI_WORKER_BATCH_SIZE=10,
    )
    worker = start_worker(config, name="bound")
    r = redis_srv.client()
    with pod_producer(redis_srv.url()) as delay:
        delay(small)
        delay(large)
    assert wait_for(lambda: len(ralph.stored()) == 1, 30), worker.text()[-3000:]
    assert ralph.stored_ids() == [small["id"]]
    assert wait_for(lambda: len(_dead(r, spool_dir)) == 1, 30), worker.text()[-3000:]
    [entry] = _dead(r, spool_dir)
    assert entry["statement"]["id"] == large["id"]
    assert entry["reason"] == "too large: its JSON text is longer than 16384 bytes in UTF-8"
    spool = Spool(spool_dir, "x@h", 0, 10, 16 * 1024)
    assert spool.stats(counts=False).headroom == 10 * (16 * 1024 + ROW_OVERHEAD_BYTES)
    spool.close()
    for bad in ("8", "2048", "big"):
        result = run_cli(config, "settings", extra={"XAPI_WORKER_MAX_STATEMENT_KB": bad})
        assert result.returncode == 3 and "XAPI_WORKER_MAX_STATEMENT_KB" in result.stderr, bad
