"""Dead letters on the worker host's disk (deadstore.py), against a real Redis and Ralph:
they take nothing of the broker's memory, the broker's list is moved to the disk exactly once
whatever kills the mover, their size limit is kept without dropping any, and they are listed,
replayed and purged wherever they are."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    VENV_BIN,
    Proxy,
    RedisServer,
    disk_dead_letters,
    pod_producer,
    run_cli,
    wait_for,
    worker_env,
)
from xapi_testsupport.statements import video_statement
from xapi_worker.delivery import iso

LEGACY = "xapi.dead_letters"


def _spool_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _refusing(ralph: Any, status: int = 400) -> Proxy:
    """Ralph behind a proxy that refuses every POST naming no statement in particular: each
    statement fails alone, and is dead-lettered."""
    return Proxy(upstream_port=ralph.port, force_status=status).start()


# --- the broker's memory ----------------------------------------------------------------------
def _keys_bytes(r: Any) -> int:
    """What the broker's keys take (MEMORY USAGE of each): the queue, the worker's keys, the
    dead letters when they are kept there."""
    return sum(int(r.memory_usage(k, samples=0) or 0) for k in r.scan_iter(count=1000))


def test_dead_letters_take_none_of_a_full_brokers_memory(
    tmp_path, ralph, make_config, start_worker
):
    """A broker at maxmemory: every statement it holds is refused by the LRS and
    dead-lettered. Kept in the broker, the dead letters replaced the messages and kept the
    broker full (Pod's producer refused for as long as they stayed); on the disk, the broker
    empties to what it held before Pod filled it."""
    srv = RedisServer(tmp_path / "oom", False, "--maxmemory", "3mb")
    proxy = _refusing(ralph)
    try:
        r = srv.client()
        empty = _keys_bytes(r)
        published, refused = [], 0
        with pod_producer(srv.url()) as delay:
            for n in range(5000):
                statement = video_statement("played", n)
                try:
                    delay(statement)
                except Exception:  # OOM, as Pod's view would see it
                    refused += 1
                    if refused >= 3:
                        break
                    continue
                published.append(statement["id"])
        assert refused >= 3, "the broker never reached maxmemory"
        full = _keys_bytes(r)
        spool_dir = _spool_dir(tmp_path)
        config = make_config(
            proxy.url, XAPI_CELERY_BROKER_URL=srv.url(), XAPI_WORKER_SPOOL_DIR=spool_dir
        )
        worker = start_worker(config)
        assert wait_for(lambda: r.llen("xapi") == 0 and r.hlen("unacked") == 0, 240), worker.text()[
            -3000:
        ]
        used = _keys_bytes(r)
        # What the queue took is given back: the dead letters are not in the broker.
        assert used - empty < (full - empty) * 0.05, (empty, full, used)
        assert int(r.info("memory")["used_memory"]) < int(r.info("memory")["maxmemory"]) * 0.8
        assert r.llen(LEGACY) == 0
        kept = disk_dead_letters(spool_dir)
        assert sorted(e["statement"]["id"] for e in kept) == sorted(published)
        assert {e["status"] for e in kept} == {400}
        # Pod's producer is served again.
        with pod_producer(srv.url()) as delay:
            for n in range(200):
                delay(video_statement("completed", n))
    finally:
        proxy.stop()
        srv.stop()


# --- the broker's list, moved to the disk exactly once ------------------------------------------
_MOVER = """
import sys
from xapi_worker.deadstore import DiskDeadLetters, move_legacy
from xapi_worker.spool import Spool
import redis
client = redis.Redis.from_url(sys.argv[1])
spool = Spool(sys.argv[2], "mover@host", 0, 1)
spool.open()
store = DiskDeadLetters(spool, 1 << 40, 0, 1)
print("ready", flush=True)
while move_legacy(client, "xapi.dead_letters", "xapi.inflight.mover@host.dead_letters", store, 50):
    pass
print("done", flush=True)
"""


def _legacy_elements(n: int) -> list[bytes]:
    """Elements of the broker's list as releases before this one wrote them, and a few that
    are no dead letter at all (bytes that are no UTF-8, no JSON)."""
    out = []
    for i in range(n):
        entry = {
            "statement": video_statement("played", i),
            "reason": f"rejected by the LRS (HTTP 400) #{i}",
            "time": iso(time.time() - 3600),
            "attempts": 1,
        }
        out.append(json.dumps(entry).encode())
    out += [b"\xff\xfe not json", b'{"unparsable": true', b"[1, 2]"]
    return out


def _disk_raw(spool_dir: Path) -> list[bytes]:
    from xapi_worker.deadstore import DiskDeadLetters
    from xapi_worker.spool import Spool

    spool = Spool(spool_dir, "mover@host")
    try:
        return [raw for _, raw in DiskDeadLetters(spool, 1 << 40).rows()]
    finally:
        spool.close()


def test_the_brokers_list_moves_to_the_disk_once_whatever_kills_the_mover(tmp_path, redis_srv):
    """A mover killed (SIGKILL) at random points, again and again, then run to its end:
    every element of the broker's list is on the disk once, byte for byte, and the broker
    holds none of them. After each kill nothing is lost: each element is in the list, in
    the claim list, or on the disk (the claim list and the disk may hold the same one for a
    moment: committed, not yet deleted from the claim list)."""
    r = redis_srv.client()
    elements = _legacy_elements(3000)
    r.rpush(LEGACY, *elements)
    spool_dir = _spool_dir(tmp_path)
    claim = "xapi.inflight.mover@host.dead_letters"
    kills = 0
    for delay in (0.05, 0.2, 0.1, 0.3, 0.15, 0.25, 0.05, 0.4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _MOVER, redis_srv.url(), str(spool_dir)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        kills += 1
        legacy, claimed, disk = (
            r.lrange(LEGACY, 0, -1),
            r.lrange(claim, 0, -1),
            _disk_raw(spool_dir),
        )
        assert len(disk) == len(set(disk)), "a dead letter written twice"
        assert set(legacy) | set(claimed) | set(disk) == set(elements), "a dead letter lost"
        assert not set(legacy) & (set(claimed) | set(disk))
        if not legacy and not claimed:
            break
    moved_before = len(_disk_raw(spool_dir))
    assert 0 < moved_before, "no kill landed after a commit"
    done = subprocess.run(
        [sys.executable, "-c", _MOVER, redis_srv.url(), str(spool_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    disk = _disk_raw(spool_dir)
    assert sorted(disk) == sorted(elements)
    assert r.llen(LEGACY) == 0 and r.llen(claim) == 0
    assert kills >= 2


def test_each_step_of_the_move_stopped_by_hand_adds_nothing_twice(tmp_path, redis_srv):
    """The two windows of the move, made by hand: claimed but not committed (a kill after
    the script), committed but the claim list not deleted (a kill after the commit)."""
    from xapi_worker.deadstore import DiskDeadLetters, move_legacy
    from xapi_worker.scripts import move_some
    from xapi_worker.spool import Spool

    r = redis_srv.client()
    elements = _legacy_elements(10)
    r.rpush(LEGACY, *elements)
    claim = "xapi.inflight.mover@host.dead_letters"
    spool = Spool(_spool_dir(tmp_path), "mover@host", 0, 1)
    spool.open()
    store = DiskDeadLetters(spool, 1 << 40, 0, 1)
    try:
        # claimed, then stopped
        assert move_some(r, LEGACY, claim, 4, "LEFT", "RIGHT") == 4
        # the next run commits the claim list first, then goes on
        assert move_legacy(r, LEGACY, claim, store, most=4) == 4
        assert r.llen(claim) == 0 and r.llen(LEGACY) == len(elements) - 4
        assert len(store.rows()) == 4
        # claimed and committed, then stopped before the claim list was deleted
        move_some(r, LEGACY, claim, 3, "LEFT", "RIGHT")
        assert store.add_raw(r.lrange(claim, 0, -1)) == 3
        assert move_legacy(r, LEGACY, claim, store) == len(elements) - 4
        assert sorted(raw for _, raw in store.rows()) == sorted(elements)
        assert r.llen(claim) == 0 and r.llen(LEGACY) == 0
    finally:
        spool.close()


def test_a_moved_dead_letter_dated_in_the_future_expires_like_the_others(tmp_path, redis_srv):
    """An element written by a node whose clock was ahead (a year 2099) is dated when it
    reaches the disk, so the retention deletes it in its time, not for ever after."""
    from xapi_worker.deadstore import DiskDeadLetters, move_legacy
    from xapi_worker.spool import Spool

    r = redis_srv.client()
    ahead = {
        "statement": video_statement("played", 1),
        "reason": "r",
        "time": "2099-01-01T00:00:00Z",
    }
    r.rpush(LEGACY, json.dumps(ahead).encode())
    spool = Spool(_spool_dir(tmp_path), "mover@host", 0, 1)
    spool.open()
    store = DiskDeadLetters(spool, 1 << 40, 30, 1)
    try:
        moved_at = time.time()
        assert move_legacy(r, LEGACY, "xapi.inflight.mover@host.dead_letters", store) == 1
        assert store.purge_older(30, now=moved_at + 29 * 86400) == 0
        assert store.purge_older(30, now=moved_at + 31 * 86400) == 1
        assert store.rows() == []
    finally:
        spool.close()


def test_the_dead_letters_claimed_by_a_node_gone_for_good_go_back_to_the_brokers_list(
    redis_srv,
):
    """A node killed between its claim of the broker's dead letters and their commit to its
    disk, and never back: the node that returns its in-flight list puts its claim list back
    at the head of the broker's list, in its order, where the retention, forget, list,
    replay and purge reach it (and any node moves it to a disk again)."""
    from kombu import Connection, Consumer, Exchange, Queue
    from xapi_worker.transport import ALIAS, DEAD_LETTERS_OPTION, NODE_OPTION

    r = redis_srv.client()
    elements = _legacy_elements(5)
    gone = "xapi.inflight.gone@host"
    claim = gone + ".dead_letters"
    r.rpush(claim, *elements[:3])  # its claim (move_some: the oldest, in order)
    r.rpush("kept.dead_letters", *elements[3:])  # what was still in the list
    r.sadd("xapi.inflight", gone)  # no heartbeat: the node is gone
    conn = Connection(
        redis_srv.url(),
        transport=ALIAS,
        transport_options={NODE_OPTION: "other", DEAD_LETTERS_OPTION: "kept.dead_letters"},
    )
    try:
        channel = conn.channel()
        queue = Queue("xapi", Exchange("xapi", "direct"), "xapi")
        Consumer(channel, [queue], callbacks=[], accept=["json"]).consume()
        with contextlib.suppress(socket.timeout, TimeoutError):
            conn.drain_events(timeout=1.5)  # the first take: the orphans' recovery
    finally:
        conn.release()
    assert not r.sismember("xapi.inflight", gone)
    assert r.llen(claim) == 0
    assert r.lrange("kept.dead_letters", 0, -1) == elements
    assert r.llen(LEGACY) == 0  # the transport option names the list


def test_a_running_worker_moves_the_brokers_list_to_its_disk(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """An upgraded site: the dead letters a worker of the release before left in the
    broker are on the node's disk once the new worker runs, listed by the CLI, and counted
    by status from the node's state."""
    r = redis_srv.client()
    elements = _legacy_elements(50)
    r.rpush(LEGACY, *elements)
    spool_dir = _spool_dir(tmp_path)
    config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir)
    worker = start_worker(config, name="up")
    assert wait_for(lambda: r.llen(LEGACY) == 0, 30), worker.text()[-3000:]
    assert len(disk_dead_letters(spool_dir)) == len(elements)
    listed = run_cli(config, "dead-letters", "list")
    assert listed.returncode == 0, listed.stderr
    assert len(_json_lines(listed.stdout)) == len(elements)
    node = f"up@{socket.gethostname()}"
    state_key = f"xapi.inflight.{node}.spool"
    expected = str(len(elements)).encode()
    assert wait_for(lambda: r.hget(state_key, "dead_letters") == expected, 20)
    state = json.loads(run_cli(config, "status").stdout)
    assert state["dead_letters"] == len(elements) and state["dead_letters_broker"] == 0
    assert "moved from the broker" in worker.text()


def _json_lines(text: str) -> list[dict[str, Any]]:
    """The entries `dead-letters list` prints (indented JSON, one after the other)."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    text = text.strip()
    while i < len(text):
        value, end = decoder.raw_decode(text, i)
        out.append(value)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return out


# --- the size limit -------------------------------------------------------------------------
def test_at_their_limit_the_expired_go_first_then_a_dead_letter_is_refused(tmp_path):
    from xapi_worker.deadstore import DeadLettersFull, DiskDeadLetters
    from xapi_worker.spool import ROW_OVERHEAD_BYTES, Spool

    spool = Spool(_spool_dir(tmp_path), "cap@host", 64 << 20, 1)
    spool.open()
    store = DiskDeadLetters(spool, 200_000, retention_days=30, batch_size=1)
    now = time.time()
    old = now - 40 * 86400
    try:

        def letter(n: int) -> dict[str, Any]:
            return {"statement": {"id": str(n), "pad": "x" * 10_000}, "reason": "r"}

        store.add([letter(0)], now=old)
        store.add([letter(1)], now=old + 1)
        size = store.stats().bytes // 2
        assert size > 10_000 + ROW_OVERHEAD_BYTES - 1
        n = 2
        while store.stats().bytes + size <= 200_000:
            store.add([letter(n)], now=now)
            n += 1
        # no room: the oldest expired one goes, then the next
        store.add([letter(n)], now=now)
        assert [e["statement"]["id"] for _, e in store.entries()][:1] == ["1"]
        store.add([letter(n + 1)], now=now)
        ids = [e["statement"]["id"] for _, e in store.entries()]
        assert "0" not in ids and "1" not in ids
        # none expired any more: refused, nothing written, nothing dropped
        before = store.entries()
        with pytest.raises(DeadLettersFull):
            store.add([letter(n + 2)], now=now)
        assert store.entries() == before
        assert store.stats().bytes <= 200_000
        # without a retention, nothing is expired: refused at once
        keep_all = DiskDeadLetters(spool, store.stats().bytes, retention_days=0, batch_size=1)
        with pytest.raises(DeadLettersFull):
            keep_all.add([letter(99)], now=now + 90 * 86400)
    finally:
        spool.close()


def test_a_node_whose_dead_letters_are_full_stops_taking_and_says_so(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """Dead letters at their limit (1 MiB here) and none expired: the node takes nothing
    more (the statements wait in Redis, none dropped), says so at CRITICAL, and shows it in
    its state (full, dead_full: check_xapi's CRITICAL) and in status; once they are purged
    it takes again."""
    proxy = _refusing(ralph)
    try:
        spool_dir = _spool_dir(tmp_path)
        config = make_config(
            proxy.url,
            XAPI_WORKER_SPOOL_DIR=spool_dir,
            XAPI_WORKER_BATCH_SIZE=1,
            XAPI_WORKER_DEAD_LETTER_MAX_MB=1,
        )
        worker = start_worker(config, name="cap")
        node = f"cap@{socket.gethostname()}"
        state_key = f"xapi.inflight.{node}.spool"
        statements = []
        for n in range(50):
            s = video_statement("played", n)
            s["result"] = {"response": "x" * 20_000}
            statements.append(s)
        with pod_producer(redis_srv.url()) as delay:
            for s in statements:
                delay(s)
        r = redis_srv.client()
        assert wait_for(lambda: r.hget(state_key, "dead_full") == b"1", 60), worker.text()[-3000:]
        assert r.hget(state_key, "full") == b"1"
        assert "dead letters of node" in worker.text() and "FULL" in worker.text()
        count = len(disk_dead_letters(spool_dir))
        assert 0 < count < len(statements)
        time.sleep(3)  # the node has stopped: nothing more is dead-lettered, nothing lost
        assert len(disk_dead_letters(spool_dir)) == count
        waiting = r.llen("xapi") + r.hlen("unacked") + r.llen(f"xapi.inflight.{node}")
        assert waiting == len(statements) - count, worker.text()[-3000:]
        state = json.loads(run_cli(config, "status").stdout)
        assert state["dead_letters_full"] == [node]
        assert state["dead_letters"] == count
        # purged: the node takes again, and the rest are dead-lettered
        purged = run_cli(config, "dead-letters", "purge", "--yes")
        assert purged.returncode == 0 and f"purged {count}" in purged.stdout, purged.stderr
        assert wait_for(lambda: len(disk_dead_letters(spool_dir)) == len(statements) - count, 60), (
            worker.text()[-3000:]
        )
        assert wait_for(lambda: r.hget(state_key, "dead_full") == b"0", 20)
    finally:
        proxy.stop()


# --- retention ------------------------------------------------------------------------------
def test_the_node_purges_its_expired_dead_letters_on_disk(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    from xapi_worker.deadstore import DiskDeadLetters
    from xapi_worker.spool import Spool

    spool_dir = _spool_dir(tmp_path)
    node = f"ret@{socket.gethostname()}"
    spool = Spool(spool_dir, node)
    spool.open()
    store = DiskDeadLetters(spool, 1 << 30)
    now = time.time()
    store.add([{"statement": {"id": "old"}, "reason": "r"}], now=now - 31 * 86400)
    store.add([{"statement": {"id": "new"}, "reason": "r"}], now=now - 29 * 86400)
    spool.close()
    config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir)
    worker = start_worker(config, name="ret")
    assert wait_for(
        lambda: [e["statement"]["id"] for e in disk_dead_letters(spool_dir)] == ["new"], 30
    ), worker.text()[-3000:]
    assert "purged 1 dead letters" in worker.text()


# --- what is stored is what is listed ---------------------------------------------------------
_ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    reason=_ANY_TEXT,
    body=_ANY_TEXT,
    response=_ANY_TEXT,
    key=_ANY_TEXT,
    number=st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
)
def test_any_dead_letter_is_listed_back_as_it_was_written(
    tmp_path_factory, reason, body, response, key, number
):
    """Reasons, bodies and answers of any characters (lone surrogates, NULs, any plane),
    any key, any number: listed back equal, and the same JSON text, by the CLI's reader."""
    from xapi_worker.content import json_text
    from xapi_worker.deadletters import DeadLetter
    from xapi_worker.deadstore import DiskDeadLetters
    from xapi_worker.spool import Spool

    spool = Spool(tmp_path_factory.mktemp("prop"), "p@host", 64 << 20, 1)
    spool.open()
    try:
        store = DiskDeadLetters(spool, 1 << 30)
        letter = DeadLetter(
            statement={"id": "x", key: body, "n": number, "nested": [{key: [body]}]},
            reason=reason,
            task_id=body[:50],
            response=response,
        )
        entry = letter.entry()
        store.add([entry])
        [(_, listed)] = store.entries()
        assert listed == entry
        assert json_text(listed) == json_text(entry)
    finally:
        spool.close()


# --- the CLI, wherever they are --------------------------------------------------------------
def test_list_replay_purge_cover_the_disk_and_the_brokers_list(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    proxy = Proxy(upstream_port=ralph.port, force_status=422).start()
    try:
        spool_dir = _spool_dir(tmp_path)
        config = make_config(proxy.url, XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_BATCH_SIZE=5)
        worker = start_worker(config, name="cli")
        statements = [video_statement("completed", n) for n in range(5)]
        with pod_producer(redis_srv.url()) as delay:
            for s in statements:
                delay(s)
        r = redis_srv.client()
        assert wait_for(lambda: len(disk_dead_letters(spool_dir)) == 5, 30), worker.text()
        assert r.llen(LEGACY) == 0
        # one more in the broker's list (a node without a spool wrote it): the worker would
        # move it; stopped first, so that the CLI meets it there
        worker.stop()
        legacy = video_statement("completed", 99)
        r.rpush(LEGACY, json.dumps({"statement": legacy, "reason": "x", "status": 422}))
        listed = run_cli(config, "dead-letters", "list")
        assert listed.returncode == 0, listed.stderr
        entries = _json_lines(listed.stdout)
        assert {e["statement"]["id"] for e in entries} == {s["id"] for s in statements} | {
            legacy["id"]
        }
        assert {e["kept_in"] for e in entries} == {
            f"cli@{socket.gethostname()}.sqlite3",
            LEGACY,
        }
        only_disk = _json_lines(run_cli(config, "dead-letters", "list", "--where", "disk").stdout)
        assert len(only_disk) == 5
        other_node = _json_lines(run_cli(config, "dead-letters", "list", "--node", "nobody").stdout)
        assert [e["kept_in"] for e in other_node] == [LEGACY]
        of_cli = run_cli(config, "dead-letters", "list", "--node", "cli").stdout
        assert len(_json_lines(of_cli)) == 6
        # replay: back on the queue, removed from wherever they were; delivered. The dead
        # letter of a message the worker could not read holds no statement: skipped, kept
        # (it was sent to the LRS as one, and dead-lettered again under another reason)
        unreadable = {"statement": {"message_body": "{[", "message_bytes": 2}, "reason": "x"}
        r.rpush(LEGACY, json.dumps(unreadable))
        proxy.force_status = None
        replay = run_cli(config, "dead-letters", "replay")
        assert replay.returncode == 0, replay.stderr
        assert "replayed 6 dead letters onto queue xapi; skipped 1" in replay.stdout
        assert disk_dead_letters(spool_dir) == []
        assert [json.loads(x) for x in r.lrange(LEGACY, 0, -1)] == [unreadable]
        worker = start_worker(config, name="cli")
        assert wait_for(lambda: len(ralph.stored()) == 6, 30), worker.text()
        # purge: --yes, both places
        worker.stop()
        r.rpush(LEGACY, json.dumps({"statement": {}, "reason": "x"}))
        from xapi_worker.deadstore import DiskDeadLetters
        from xapi_worker.spool import Spool

        spool = Spool(spool_dir, f"cli@{socket.gethostname()}")
        DiskDeadLetters(spool, 1 << 30).add([{"statement": {}, "reason": "y"}])
        spool.close()
        assert run_cli(config, "dead-letters", "purge").returncode == 2
        purged = run_cli(config, "dead-letters", "purge", "--yes")
        assert purged.returncode == 0 and "purged 3" in purged.stdout, purged.stderr
        assert disk_dead_letters(spool_dir) == [] and r.llen(LEGACY) == 0
    finally:
        proxy.stop()


def test_list_with_no_node_file_yet_prints_nothing(tmp_path, make_config):
    """`dead-letters list` with the spool on and no node file yet: nothing, exit 0."""
    config = make_config("http://127.0.0.1:9/", XAPI_WORKER_SPOOL_DIR=_spool_dir(tmp_path))
    out = subprocess.run(
        [str(VENV_BIN / "xapi-worker"), "dead-letters", "list"],
        env={**os.environ, "XAPI_WORKER_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout == "", out.stderr


# --- the move stays roomy; a spooled row's dead letter is written once -------------------------
def _settings(config: Path) -> Any:
    from xapi_worker.settings import load_settings

    return load_settings({"XAPI_WORKER_CONFIG": str(config)})


def test_the_move_from_the_broker_leaves_the_nodes_dead_letters_roomy(
    tmp_path, redis_srv, make_config, caplog
):
    """A broker's list larger than a node's dead letters may hold: the move stopped only at
    the hard limit, which left the store full (less than a batch of room), and the node
    stopped taking live statements for dead letters that harmed nothing where they were.
    Now it moves only while the store stays roomy, leaves the rest in the broker's list,
    and says so (once a minute)."""
    from xapi_worker.drain import Drainer
    from xapi_worker.spool import Spool
    from xapi_worker.worker import make_celery

    r = redis_srv.client()

    def element(n: int) -> bytes:
        # 2,000 bytes each: two chunks of the move (400) fit in the hard limit of 4 MiB,
        # with less than a batch's headroom left (full)
        base = {"statement": {"id": f"{n:04d}", "pad": ""}, "reason": "r"}
        base["statement"]["pad"] = "x" * (2000 - len(json.dumps(base)))
        return json.dumps(base).encode()

    elements = [element(n) for n in range(500)]
    assert {len(e) for e in elements} == {2000}
    r.rpush(LEGACY, *elements)
    spool_dir = _spool_dir(tmp_path)
    config = make_config(
        "http://127.0.0.1:9/",
        XAPI_WORKER_SPOOL_DIR=spool_dir,
        XAPI_WORKER_BATCH_SIZE=1,
        XAPI_WORKER_DEAD_LETTER_MAX_MB=4,
    )
    settings = _settings(config)
    node = "roomy@host"
    drainer = Drainer(make_celery(settings), settings, Spool(spool_dir, node), node)
    try:
        assert drainer.dead is not None
        with caplog.at_level("WARNING", logger="xapi_worker.spool"):
            for _ in range(3):
                drainer.move_dead_letters()
        stats = drainer.dead.stats()
        assert 0 < stats.count < len(elements)
        assert stats.roomy and not stats.full, stats
        assert r.llen(LEGACY) == len(elements) - stats.count
        assert r.lrange(LEGACY, 0, -1) == elements[stats.count :]  # the rest, in order
        said = [m for m in caplog.messages if "stay in the broker's" in m]
        assert len(said) == 1, caplog.messages
        assert f"{len(elements) - stats.count} dead letters stay" in said[0]
    finally:
        drainer._finish()


def test_a_spooled_rows_dead_letter_and_its_deletion_are_one_transaction(
    tmp_path, redis_srv, ralph, make_config
):
    """The drainer wrote a refused row's dead letter, and deleted the row only on its next
    turn: a kill in between (or a reschedule of another row that failed, or `spool drain`
    beside the node delivering the same rows) sent the row again and wrote a second dead
    letter. Now the row is gone once its dead letter is written, and a second delivery of
    rows read before writes none."""
    from xapi_worker.drain import DrainProcessor
    from xapi_worker.spool import Spool
    from xapi_worker.worker import make_celery

    proxy = _refusing(ralph)
    spool_dir = _spool_dir(tmp_path)
    node = "once@host"
    statements = [video_statement("played", n) for n in range(3)]
    spool = Spool(spool_dir, node)
    spool.open()
    now = time.time()
    from xapi_worker.spool import Entry

    spool.add([Entry(s, f"t{n}", 1, now, now) for n, s in enumerate(statements)])
    spool.close()
    try:
        settings = _settings(make_config(proxy.url, XAPI_WORKER_SPOOL_DIR=spool_dir))
        app = make_celery(settings)
        first, second = Spool(spool_dir, node), Spool(spool_dir, node)
        try:
            rows = first.due(10)
            assert len(rows) == 3
            # the drainer delivers; it is killed before its next turn deletes anything
            assert sorted(DrainProcessor(app, settings, first).deliver(rows)) == sorted(
                r.id for r in rows
            )
            assert first.stats().depth == 0
            assert len(disk_dead_letters(spool_dir)) == 3
            # another process had read the same rows (spool drain beside the node)
            DrainProcessor(app, settings, second).deliver(rows)
            dead = disk_dead_letters(spool_dir)
            assert sorted(e["statement"]["id"] for e in dead) == sorted(s["id"] for s in statements)
        finally:
            first.close()
            second.close()
    finally:
        proxy.stop()


# --- replay beside a moving node ------------------------------------------------------------
def _queued_ids(r: Any) -> list[str]:
    """The statement ids of the messages on the queue (Celery's protocol 2, kombu's base64)."""
    import base64

    ids = []
    for raw in r.lrange("xapi", 0, -1):
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        ids.append(json.loads(body)[0][0]["id"])
    return ids


def test_a_replay_beside_a_moving_node_sends_a_dead_letter_or_leaves_it(
    tmp_path, redis_srv, make_config
):
    """`dead-letters replay` read the broker's list, then sent each statement and removed
    its element: an element a node moved to its disk meanwhile was replayed and kept on that
    disk (listed, and replayed again by a later run), the removal finding nothing, unsaid.
    Now each element is claimed before its statement is sent: one moved meanwhile is not
    sent, and the replay says how many were."""
    from xapi_worker.deadstore import DiskDeadLetters, move_legacy
    from xapi_worker.spool import Spool

    r = redis_srv.client()
    elements = _legacy_elements(3000)[:3000]
    r.rpush(LEGACY, *elements)
    every = {json.loads(e)["statement"]["id"] for e in elements}
    spool_dir = _spool_dir(tmp_path)
    config = make_config("http://127.0.0.1:9/", XAPI_WORKER_SPOOL_DIR=spool_dir)
    replay = subprocess.Popen(
        [str(VENV_BIN / "xapi-worker"), "dead-letters", "replay", "--where", "broker"],
        env=worker_env(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not r.llen("xapi") and time.monotonic() < deadline:
            time.sleep(0.002)
        # the replay has read the list and is sending: a node moves the rest to its disk
        spool = Spool(spool_dir, "mover@host", 0, 1)
        spool.open()
        try:
            store = DiskDeadLetters(spool, 1 << 40)
            moved = move_legacy(r, LEGACY, "xapi.inflight.mover@host.dead_letters", store, 10**6)
            on_disk = {e["statement"]["id"] for _, e in store.entries()}
        finally:
            spool.close()
        out, err = replay.communicate(timeout=120)
    finally:
        if replay.poll() is None:
            replay.kill()
    assert replay.returncode == 0, err
    assert 0 < moved < len(elements), "the move did not land while the replay ran"
    queued = _queued_ids(r)
    assert len(queued) == len(set(queued))
    assert not set(queued) & on_disk, "replayed and kept on a node's disk"
    assert set(queued) | on_disk == every
    assert r.llen(LEGACY) == 0
    assert f"replayed {len(queued)} dead letters" in out
    # on stdout: what playbooks/dead-letters.yml shows
    assert f"{len(on_disk)} dead letters were moved or removed by another process" in out
    # the run left the registry, its heartbeat and its claim list
    assert not [m for m in r.smembers("xapi.inflight") if b"replay-" in m]
    assert not list(r.scan_iter("xapi.inflight.replay-*"))


def test_a_replay_killed_leaves_its_claim_where_forget_and_the_workers_find_it(
    tmp_path, redis_srv, make_config
):
    """A replay killed between a claim and its deletion: the element is in the run's claim
    list, registered as a node's with a heartbeat (so forget reads it); once the heartbeat
    has expired, a worker node puts it back at the head of the broker's list."""
    from kombu import Connection, Consumer, Exchange, Queue
    from xapi_worker.transport import ALIAS, DEAD_LETTERS_OPTION, NODE_OPTION

    r = redis_srv.client()
    elements = _legacy_elements(3000)[:3000]
    r.rpush(LEGACY, *elements)
    config = make_config("http://127.0.0.1:9/")
    replay = subprocess.Popen(
        [str(VENV_BIN / "xapi-worker"), "dead-letters", "replay"],
        env=worker_env(config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while r.llen("xapi") < 200 and time.monotonic() < deadline:
        time.sleep(0.002)
    replay.kill()
    replay.wait(10)
    members = [m.decode() for m in r.smembers("xapi.inflight") if b"replay-" in m]
    assert len(members) == 1, members
    [member] = members
    assert r.exists(member + ".alive")
    claimed = r.lrange(member + ".dead_letters", 0, -1)
    queued = set(_queued_ids(r))
    left = r.lrange(LEGACY, 0, -1)
    every = {json.loads(e)["statement"]["id"] for e in elements}
    assert len(claimed) <= 1
    held = {json.loads(e)["statement"]["id"] for e in [*claimed, *left]}
    assert held | queued == every, "a dead letter lost"
    # the heartbeat expires (by hand here): a worker node's recovery puts the claim back
    r.delete(member + ".alive", "xapi")  # (the replayed messages: delivered elsewhere)
    conn = Connection(
        redis_srv.url(),
        transport=ALIAS,
        transport_options={NODE_OPTION: "other", DEAD_LETTERS_OPTION: LEGACY},
    )
    try:
        channel = conn.channel()
        queue = Queue("xapi", Exchange("xapi", "direct"), "xapi")
        Consumer(channel, [queue], callbacks=[], accept=["json"]).consume()
        with contextlib.suppress(socket.timeout, TimeoutError):
            conn.drain_events(timeout=1.5)  # the first take: the orphans' recovery
    finally:
        conn.release()
    assert not r.sismember("xapi.inflight", member)
    assert r.llen(member + ".dead_letters") == 0
    assert r.lrange(LEGACY, 0, -1) == [*claimed, *left]


# --- a statement too large to keep ------------------------------------------------------------
def _huge(n: int, mbox: str, name: str = "Jane") -> dict[str, Any]:
    """A statement of about 300 kB (a result extension), far over a limit of 16 KiB."""
    statement = video_statement("played", n)
    statement["actor"] = {"objectType": "Agent", "name": name, "mbox": mbox}
    pad = {"https://w3id.org/xapi/video/extensions/pad": "a" * 300_000}
    statement["result"] = {"extensions": pad}
    return statement


@pytest.mark.parametrize("spool", [False, True], ids=["broker", "disk"])
def test_a_statement_too_large_is_dead_lettered_as_a_bounded_summary(
    tmp_path, spool, redis_srv, ralph, make_config, start_worker
):
    """A statement over XAPI_WORKER_MAX_STATEMENT_KB was dead-lettered whole (up to Pod's
    2.5 MiB request limit): about 250 anonymous POSTs filled a node's dead letters, and the
    node stopped taking (review s6, M2). Its dead letter is now a summary of at most a few
    KiB: id, actor, verb and object ids, length, SHA-256, head of its text. Replay skips it
    and says so; forget still finds the learner in it, by its actor or, when the actor was
    too large to keep, by what is left of it."""
    from xapi_worker.content import (
        STATEMENT_BYTES,
        STATEMENT_CUT,
        STATEMENT_HEAD,
        STATEMENT_SHA256,
        json_text,
    )

    spool_dir = _spool_dir(tmp_path) if spool else None
    extra: dict[str, Any] = {"XAPI_WORKER_SPOOL_DIR": spool_dir} if spool else {}
    config = make_config(
        ralph.url, XAPI_WORKER_MAX_STATEMENT_KB=16, XAPI_WORKER_BATCH_SIZE=10, **extra
    )
    jane = "mailto:jane@example.org"
    kept_actor = _huge(1, jane)
    long_name = _huge(2, jane, name="J" * 5000)  # the actor too large: its mbox is kept
    other = _huge(3, "mailto:bob@example.org")
    # a group too large to keep: her mbox is found in the head of the text
    group = _huge(4, jane)
    members = [{"mbox": f"mailto:m{n}@example.org", "name": f"M {n}"} for n in range(40)]
    group["actor"] = {"objectType": "Group", "member": [group["actor"], *members]}
    huge = [kept_actor, long_name, other, group]
    worker = start_worker(config, name="huge")
    with pod_producer(redis_srv.url()) as delay:
        for s in huge:
            delay(s)
    r = redis_srv.client()

    def dead() -> list[dict[str, Any]]:
        kept = [json.loads(x) for x in r.lrange(LEGACY, 0, -1)]
        return kept + (disk_dead_letters(spool_dir) if spool_dir is not None else [])

    assert wait_for(lambda: len(dead()) == 4, 30), worker.text()[-3000:]
    worker.stop()
    assert ralph.stored() == []
    letters = {e["statement"].get("id"): e for e in dead()}
    assert set(letters) == {s["id"] for s in huge}
    for s in huge:
        entry = letters[s["id"]]
        text = json_text(s).encode("utf-8")
        summary = entry["statement"]
        assert STATEMENT_CUT in summary
        assert entry["reason"] == "too large: its JSON text is longer than 16384 bytes in UTF-8"
        assert summary["verb"] == {"id": s["verb"]["id"]}
        assert summary["object"] == {"id": s["object"]["id"]}
        assert summary[STATEMENT_BYTES] == len(text)
        assert summary[STATEMENT_SHA256] == hashlib.sha256(text).hexdigest()
        assert summary[STATEMENT_HEAD] == text[:4096].decode("utf-8")
        assert len(json.dumps(entry).encode("utf-8")) < 16 * 1024  # not 300 kB
    assert letters[kept_actor["id"]]["statement"]["actor"] == kept_actor["actor"]
    assert letters[long_name["id"]]["statement"]["actor"] == {"objectType": "Agent", "mbox": jane}
    assert "actor" not in letters[group["id"]]["statement"]
    assert jane in letters[group["id"]]["statement"][STATEMENT_HEAD]
    # replay: nothing to send, said; the dead letters stay
    replay = run_cli(config, "dead-letters", "replay")
    assert replay.returncode == 0, replay.stderr
    assert "replayed 0 dead letters onto queue xapi; skipped 4" in replay.stdout
    assert "4 of the skipped dead letters keep only the summary" in replay.stdout
    assert r.llen("xapi") == 0 and len(dead()) == 4
    # forget finds the learner in her three summaries, and leaves the other's
    out = subprocess.run(
        [str(VENV_BIN / "xapi-worker"), "forget", "--stdin", "--wait", "0"],
        env=worker_env(config),
        input=json.dumps({"mbox": jane}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["removed"]["dead_letters"] == 3, report
    assert [e["statement"]["id"] for e in dead()] == [other["id"]]
