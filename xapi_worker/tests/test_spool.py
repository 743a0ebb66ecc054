"""The durable spool, against a real Redis, a real Ralph and a real Celery worker: an LRS
outage empties the broker into the spool, the spool drains once the LRS is back, a full
spool stops the node taking, a damaged spool is set aside, a kill mid-drain loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import Proxy, pod_producer, run_cli, wait_for
from xapi_testsupport.statements import video_statement
from xapi_worker.spool import Entry, Spool, node_file


def _spool_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _status(config: Path) -> dict[str, Any]:
    out = run_cli(config, "status")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _produce(url: str, statements: list[dict[str, Any]]) -> None:
    with pod_producer(url) as delay:
        for statement in statements:
            delay(statement)


def _exactly_once(ids: list[str], expected: set[str]) -> None:
    dupes = [i for i, c in Counter(ids).items() if c > 1]
    assert not dupes, f"stored twice: {dupes[:5]}"
    assert set(ids) == expected, f"missing {len(expected - set(ids))}"


def _spool_depth(directory: Path, node: str) -> int:
    spool = Spool(directory, node)
    try:
        return spool.stats().depth
    finally:
        spool.close()


def _spooled_before(directory: Path, node: str, statements: list[dict[str, Any]]) -> None:
    """A node's spool as an earlier outage leaves it: every statement due now."""
    spool = Spool(directory, node)
    spool.open()
    now = time.time()
    spool.add(
        [Entry(s, f"task-{n}", 2, now - 60, now, "HTTP 503") for n, s in enumerate(statements)]
    )
    spool.close()


def test_outage_moves_the_queue_to_the_spool_then_drains(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    spool_dir = _spool_dir(tmp_path)
    config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_BATCH_SIZE=50)
    worker = start_worker(config, name="sp")
    node = worker_node("sp")
    ralph.stop()
    statements = [video_statement("played", n, with_id=True) for n in range(600)]
    _produce(redis_srv.url(), statements)
    client = redis_srv.client()
    # Everything leaves the broker's memory for the spool, acknowledged.
    assert wait_for(lambda: _spool_depth(spool_dir, node) == 600, 60), worker.text()[-3000:]
    assert wait_for(lambda: client.llen("xapi") == 0 and client.hlen("unacked") == 0, 30)
    path = spool_dir / node_file(node)
    assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)
    assert "without a POST" in worker.text()
    state = wait_for_value(lambda: _status(config), lambda s: s["spool"] == 600, 15)
    assert state["spool_full"] == [] and state["spool_oldest_age_s"] >= 0
    ralph.start()
    assert wait_for(lambda: len(ralph.stored()) >= 600, 120), worker.text()[-3000:]
    _exactly_once(ralph.stored_ids(), {s["id"] for s in statements})
    assert wait_for(lambda: _spool_depth(spool_dir, node) == 0, 30)
    metrics = {k.decode(): v.decode() for k, v in client.hgetall("xapi.metrics").items()}
    assert int(metrics["spooled"]) >= 600
    assert int(metrics["delivered"]) == 600
    assert client.llen("xapi.dead_letters") == 0


def _described(statement: dict[str, Any]) -> dict[str, Any]:
    """``statement`` with its video's description (Pod's videos have one), 7,000 characters."""
    statement["object"]["definition"]["description"] = {"fr": "Description de la video. " * 280}
    return statement


def test_full_spool_stops_taking_and_drops_nothing(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    spool_dir = _spool_dir(tmp_path)
    # 4 MiB: statements of 16 KiB at most, batches of 5 (a headroom of 120 KiB), the dead
    # letters' smallest limit (1 MiB) within the same file: about 3,900 statements fill it
    config = make_config(
        ralph.url,
        XAPI_WORKER_SPOOL_DIR=spool_dir,
        XAPI_WORKER_SPOOL_MAX_MB=4,
        XAPI_WORKER_DEAD_LETTER_MAX_MB=1,
        XAPI_WORKER_MAX_STATEMENT_KB=16,
        XAPI_WORKER_BATCH_SIZE=5,
    )
    worker = start_worker(config, name="full")
    ralph.stop()
    # More than the spool can hold by their text alone, so the node stops taking with
    # statements still waiting in the broker whatever the timing. (4,000 short ones took
    # 4.3 MB spooled at once, under the 4.9 MB where the node stops: it stopped before
    # taking them all only when the drainer's rewrites of the rows meanwhile had grown the
    # file enough, and otherwise took them all, nothing waiting.) Fewer, larger statements:
    # fewer POSTs of 5 in the drain, which Ralph's FS backend makes slow (a read of its
    # whole store each).
    statements = [_described(video_statement("paused", n, with_id=True)) for n in range(1000)]
    assert sum(len(json.dumps(s).encode()) for s in statements) > 6 * 1024**2
    _produce(redis_srv.url(), statements)
    assert wait_for(lambda: "FULL" in worker.text(), 90), worker.text()[-3000:]
    state = wait_for_value(lambda: _status(config), lambda s: s["spool_full"], 20)
    assert state["spool_full"] == [worker_node("full")]
    client = redis_srv.client()
    # The rest waits in the broker: taken by nobody, dropped by nobody.
    waiting = client.llen("xapi") + client.hlen("unacked")
    spooled = _spool_depth(spool_dir, worker_node("full"))
    assert spooled > 0 and waiting > 0
    assert spooled + waiting >= len(statements)
    ralph.start()
    stored = wait_for(lambda: len(set(ralph.stored_ids())) >= len(statements), 240)
    assert stored, worker.text()[-3000:]
    _exactly_once(ralph.stored_ids(), {s["id"] for s in statements})
    assert "takes from the broker again" in worker.text()


def test_full_disk_stops_taking_and_drops_nothing(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """The spool's filesystem fills up (another writer, as an encoding's ffmpeg would): the
    node stops taking before SQLite meets ENOSPC, says so, and takes again once there is
    room. A real filesystem of 64 MiB (tmpfs), a ballast file leaving 20 MiB free, and a
    spool limit far above it, so only the disk can be what is full."""
    mount = tmp_path / "fs"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        spool_dir = _spool_dir(mount)
        ballast = mount / "ballast"
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        with ballast.open("wb") as f:
            f.truncate(0)
            chunk = b"\0" * 1024**2
            for _ in range((free - 20 * 1024**2) // len(chunk)):
                f.write(chunk)
        config = make_config(  # batches of 10: the node stops below 16 + 2.6 MiB free
            ralph.url,
            XAPI_WORKER_SPOOL_DIR=spool_dir,
            XAPI_WORKER_SPOOL_MAX_MB=1024,
            XAPI_WORKER_BATCH_SIZE=10,
        )
        worker = start_worker(config, name="disk")
        node = worker_node("disk")
        ralph.stop()
        statements = [video_statement("played", n, with_id=True) for n in range(6000)]
        _produce(redis_srv.url(), statements)
        assert wait_for(lambda: "its disk has" in worker.text(), 90), worker.text()[-3000:]
        state = wait_for_value(lambda: _status(config), lambda s: s["spool_full"], 20)
        assert state["spool_full"] == [node]
        time.sleep(5)  # no write failing in a loop meanwhile
        client = redis_srv.client()
        waiting = client.llen("xapi") + client.hlen("unacked")
        spooled = _spool_depth(spool_dir, node)
        assert spooled > 0 and waiting > 0
        assert spooled + waiting >= 6000
        log = worker.text()
        assert "OperationalError" not in log, log[-3000:]
        assert log.count("put back on the broker") <= 3, log[-3000:]
        # Room again (the ballast goes), the LRS back: everything arrives, once.
        ballast.unlink()
        ralph.start()
        assert wait_for(lambda: len(set(ralph.stored_ids())) >= 6000, 240), worker.text()[-3000:]
        _exactly_once(ralph.stored_ids(), {s["id"] for s in statements})
        assert "takes from the broker again" in worker.text()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_damaged_spool_is_set_aside_never_deleted(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    spool_dir = _spool_dir(tmp_path)
    node = worker_node("dmg")
    damaged = spool_dir / node_file(node)
    garbage = b"SQLite format 3\x00" + os.urandom(8192)
    damaged.write_bytes(garbage)
    config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir)
    worker = start_worker(config, name="dmg")
    kept = list(spool_dir.glob(node_file(node) + ".damaged-*"))
    assert [p.read_bytes() for p in kept] == [garbage]
    assert "is damaged" in worker.text()
    state = wait_for_value(lambda: _status(config), lambda s: s["spool_damaged"] == 1, 15)
    assert state["spool_damaged"] == 1
    # The new spool works: a statement goes through.
    statement = video_statement("played", 1, with_id=True)
    _produce(redis_srv.url(), [statement])
    assert wait_for(lambda: statement["id"] in ralph.stored_ids(), 30), worker.text()[-2000:]


def test_kill_in_the_middle_of_a_drain_loses_nothing(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    spool_dir = _spool_dir(tmp_path)
    node = worker_node("mid")
    statements = [video_statement("seeked", n, with_id=True) for n in range(1500)]
    _spooled_before(spool_dir, node, statements)
    proxy = Proxy(upstream_port=ralph.port, delay=0.3).start()
    try:
        config = make_config(proxy.url, XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_BATCH_SIZE=50)
        worker = start_worker(config, name="mid")
        assert wait_for(lambda: 100 <= len(ralph.stored()), 60), worker.text()[-2000:]
        worker.kill()
        left = _spool_depth(spool_dir, node)
        assert 0 < left < 1500
        worker = start_worker(config, name="mid")
        assert wait_for(lambda: _spool_depth(spool_dir, node) == 0, 120), worker.text()[-2000:]
    finally:
        proxy.stop()
    _exactly_once(ralph.stored_ids(), {s["id"] for s in statements})


def test_sigkill_mid_write_leaves_whole_rows(tmp_path):
    """A writer killed while committing batches: the spool opens clean, every row is whole."""
    spool_dir = _spool_dir(tmp_path)
    code = (
        "import sys, time\n"
        "from xapi_worker.spool import Entry, Spool\n"
        "s = Spool(sys.argv[1], 'k@h'); s.open()\n"
        "n = 0\n"
        "while True:\n"
        "    s.add([Entry({'id': f'{n}-{i}', 'pad': 'x' * 2000}, 't', 1, time.time(),"
        " time.time()) for i in range(100)])\n"
        "    n += 1\n"
        "    print(n, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(spool_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(20):
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    spool = Spool(spool_dir, "k@h")
    assert spool.open() == []  # nothing set aside: SQLite's journal did its work
    rows = spool.rows()
    assert len(rows) % 100 == 0 and len(rows) >= 2000
    assert all(len(r.statement["pad"]) == 2000 for r in rows)
    spool.close()


def test_spool_cli_list_and_drain(tmp_path, redis_srv, ralph, make_config):
    spool_dir = _spool_dir(tmp_path)
    statements = [video_statement("played", n, with_id=True) for n in range(250)]
    spool = Spool(spool_dir, "cli@h")
    spool.open()
    now = time.time()
    spool.add(
        [Entry(s, f"t{n}", 3, now - 10, now + 600, "HTTP 502") for n, s in enumerate(statements)]
    )
    spool.close()
    config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir)
    listed = run_cli(config, "spool", "list", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [x["statement_id"] for x in lines] == [s["id"] for s in statements[:5]]
    assert "statement" not in lines[0] and lines[0]["last_error"] == "HTTP 502"
    ralph.stop()
    refused = run_cli(config, "spool", "drain")
    assert refused.returncode == 6, refused.stdout + refused.stderr
    ralph.start()
    drained = run_cli(config, "spool", "drain")
    assert drained.returncode == 0, drained.stderr
    assert "drained 250 statements" in drained.stdout
    _exactly_once(ralph.stored_ids(), {s["id"] for s in statements})
    assert _spool_depth(spool_dir, "cli@h") == 0


def test_dead_letters_purge_older_than(tmp_path, redis_srv, ralph, make_config):
    client = redis_srv.client()
    old = {"statement": {"id": "old"}, "time": "2020-01-01T00:00:00Z", "reason": "x"}
    new = {"statement": {"id": "new"}, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ"), "reason": "x"}
    client.rpush("xapi.dead_letters", json.dumps(old), json.dumps(new))
    config = make_config(ralph.url)
    out = run_cli(config, "dead-letters", "purge", "--older-than", "30")
    assert out.returncode == 0, out.stderr
    assert "purged 1 dead letters older than 30 days" in out.stdout
    left = [json.loads(x)["statement"]["id"] for x in client.lrange("xapi.dead_letters", 0, -1)]
    assert left == ["new"]


def test_spool_file_is_the_workers_only(tmp_path):
    spool_dir = _spool_dir(tmp_path)
    old = os.umask(0o022)
    try:
        spool = Spool(spool_dir, "perm@h")
        spool.open()
        spool.add([Entry({"id": "a"}, "t", 1, time.time(), time.time())])
        spool.close()
    finally:
        os.umask(old)
    for path in spool_dir.iterdir():
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    with sqlite3.connect(spool_dir / node_file("perm@h")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def worker_node(name: str) -> str:
    import socket

    return f"{name}@{socket.gethostname()}"


def wait_for_value(read, ok, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    value = read()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def test_due_leaves_out_the_batch_at_the_lrs(tmp_path):
    """The drainer reads the next batch while one is at the LRS: that one is left out."""
    spool = Spool(_spool_dir(tmp_path), "due@h")
    spool.open()
    now = time.time()
    spool.add([Entry(video_statement("played", n), f"t{n}", 1, now, now - 1) for n in range(10)])
    first = spool.due(4, now)
    assert [r.task_id for r in first] == ["t0", "t1", "t2", "t3"]
    ahead = spool.due(4, now, exclude=[r.id for r in first])
    assert [r.task_id for r in ahead] == ["t4", "t5", "t6", "t7"]
    spool.reschedule([first[1].id], now + 60, "HTTP 503")
    spool.delete([first[0].id, first[2].id, first[3].id])
    assert [r.task_id for r in spool.due(10, now, exclude=[r.id for r in ahead])] == ["t8", "t9"]
    spool.close()


def test_drain_through_intermittent_failures_stores_each_once(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """Every third POST of the drain fails: the batch read ahead meanwhile is dropped, the
    failed batch comes again, and every statement is stored once."""
    spool_dir = _spool_dir(tmp_path)
    node = worker_node("flaky")
    statements = [video_statement("paused", n, with_id=True) for n in range(600)]
    _spooled_before(spool_dir, node, statements)
    posts = iter(range(10**6))

    def every_third(req: Any) -> tuple[int, dict[str, str], bytes] | None:
        if req.method == "POST" and next(posts) % 3 == 2:
            return 503, {"Content-Type": "application/json"}, b'{"detail": "busy"}'
        return None

    proxy = Proxy(upstream_port=ralph.port, respond=every_third).start()
    try:
        config = make_config(proxy.url, XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_BATCH_SIZE=50)
        worker = start_worker(config, name="flaky")
        assert wait_for(lambda: _spool_depth(spool_dir, node) == 0, 120), worker.text()[-2000:]
        failed = sum(1 for r in proxy.requests if r.method == "POST") // 3
        assert failed >= 4, "the LRS failed too few POSTs for the test to mean anything"
    finally:
        proxy.stop()
    _exactly_once(ralph.stored_ids(), {s["id"] for s in statements})


def test_a_spool_of_the_previous_format_is_kept_and_gains_the_lone_failures_column(tmp_path):
    directory = _spool_dir(tmp_path)
    path = directory / node_file("old@host")
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE spool (
            id INTEGER PRIMARY KEY AUTOINCREMENT, statement_id TEXT NOT NULL,
            statement TEXT NOT NULL, task_id TEXT NOT NULL, attempts INTEGER NOT NULL,
            first_seen REAL NOT NULL, spooled_at REAL NOT NULL, next_at REAL NOT NULL,
            last_error TEXT NOT NULL DEFAULT '');
        CREATE INDEX spool_due ON spool (next_at, id);
        INSERT INTO spool VALUES (1, 's1', '{"id":"s1"}', 't1', 3, 1.0, 2.0, 3.0, 'HTTP 503');
        PRAGMA user_version = 1;
        """
    )
    conn.close()
    spool = Spool(directory, "old@host")
    assert spool.open() == []  # not set aside as damaged
    (row,) = spool.rows()
    assert row.statement == {"id": "s1"} and row.attempts == 3 and row.lone_failures == 0
    spool.reschedule([1], 10.0, "HTTP 500", lone_failures={1: 4})
    assert spool.rows()[0].lone_failures == 4
    spool.close()


def test_rows_parked_by_an_earlier_run_are_woken_at_start(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """A far Retry-After parks spooled rows; the worker restarted, they used to wait until
    then whatever the LRS did (a date in 2028: 389 days). They are due at start now."""
    spool_dir = _spool_dir(tmp_path)
    node = worker_node("park")
    statements = [video_statement("played", n) for n in range(30)]
    spool = Spool(spool_dir, node)
    spool.open()
    now = time.time()
    spool.add(
        [Entry(s, f"t{n}", 2, now, now + 30 * 86400, "HTTP 503") for n, s in enumerate(statements)]
    )
    spool.close()
    worker = start_worker(make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir), name="park")
    assert wait_for(lambda: len(ralph.stored()) == 30, 30), worker.text()[-3000:]
    _exactly_once(ralph.stored_ids(), {s["id"] for s in statements})
    assert "parked by an earlier run are due now" in worker.text()


def test_one_rule_for_a_full_spool_or_disk_with_hysteresis(tmp_path, monkeypatch):
    """The pause rule and add() disagreed: between 16 MiB and 16 MiB plus a batch of free
    space the node took, add() refused, the batch went back to the broker, forever. Now a
    node that takes is never refused a batch, and takes again only well away from the
    limit where it stopped."""
    from xapi_worker import spool as spool_module

    spool = Spool(_spool_dir(tmp_path), "rule@h", max_bytes=1024**3, batch_size=10)
    spool.open()
    now = time.time()
    batch = [Entry(video_statement("played", n), f"t{n}", 1, now, now) for n in range(10)]
    reserve = spool_module.DISK_RESERVE_BYTES
    taking = refused = 0
    for above in range(0, 16 * 1024**2, 256 * 1024):  # free: the reserve, and that much more
        monkeypatch.setattr(spool_module, "free_bytes", lambda _d, a=above: reserve + a)
        stats = spool.stats(counts=False)
        if stats.full:
            with pytest.raises(spool_module.SpoolFull):
                spool.add(batch * 200)  # far more than the headroom: refused
            refused += 1
            assert not stats.roomy
            continue
        taking += 1
        spool.add(batch)  # a node that takes: its batch is accepted
        assert stats.roomy == (above >= stats.headroom + spool_module.RESUME_DISK_BYTES)
    assert refused and taking
    spool.close()


def test_the_headroom_counts_bytes_and_the_largest_batch(tmp_path):
    """The headroom assumed batches of at most 1 MiB and add() counted characters: a batch
    of statements in Greek (2 bytes a character) or with emoji (4) wrote up to four times
    what was counted, past the spool's limit, and a batch of large statements was refused
    by a node that took (taken, refused, put back). Now both count encoded bytes, and the
    node stops taking with less room than one batch of the largest statements it takes."""
    limit = 64 * 1024**2
    spool = Spool(_spool_dir(tmp_path), "bytes@h", max_bytes=limit)
    spool.batch_size = 10
    spool.open()
    now = time.time()
    # just under the largest statement taken (content.MAX_STATEMENT_BYTES, 256 KiB) in
    # UTF-8: 8 bytes, 3 characters a time
    text = "\u03b1\u03b2\U0001f600" * (256 * 1024 // 8 - 300)
    taken = 0
    for n in range(200):
        stats = spool.stats(counts=False)
        if stats.full:
            break
        batch = [
            Entry({**video_statement("played", n * 10 + i), "pad": text}, f"t{i}", 1, now, now)
            for i in range(10)
        ]
        spool.add(batch)  # a node that takes is never refused its batch
        taken += 1
        assert spool.stats(counts=False).used_bytes <= limit
    assert taken >= 3 and spool.stats(counts=False).full
    spool.close()


def _on_disk(path: Path) -> int:
    return sum(
        p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
    )


def test_the_spool_shrinks_after_a_drain(tmp_path):
    """auto_vacuum was set after the WAL mode, so it stayed off, and the drainer compacted
    only when the rows' pages (free pages left out) passed 4 MiB: never after a drain.
    The spool stayed at its largest (20.6 MB after 5,000 rows). Goal: at most 1 MiB on disk
    within a minute of draining 25,000."""
    from xapi_worker.drain import Drainer
    from xapi_worker.settings import settings_from_mapping
    from xapi_worker.worker import make_celery

    directory = _spool_dir(tmp_path)
    spool = Spool(directory, "shrink@h")
    spool.open()
    now = time.time()
    for start in range(0, 25_000, 2_500):
        spool.add(
            [
                Entry(video_statement("played", n), f"t{n}", 1, now, now)
                for n in range(start, start + 2_500)
            ]
        )
    assert _on_disk(spool.path) > 10 * 1024**2
    while rows := spool.rows(2_500):
        spool.delete([r.id for r in rows])
    spool.close()
    settings = settings_from_mapping(
        {
            "XAPI_LRS_URL": "http://127.0.0.1:9/xAPI/statements/",
            "XAPI_LRS_LOGIN": "u",
            "XAPI_LRS_PWD": "p",
            "XAPI_CELERY_BROKER_URL": "redis://127.0.0.1:9/6",  # nothing there: best effort
            "XAPI_WORKER_DEAD_LETTER_RETENTION_DAYS": "0",
        }
    )
    drainer = Drainer(make_celery(settings), settings, Spool(directory, "shrink@h"), "shrink@h")
    started = time.monotonic()
    drainer.step()  # idle: nothing due
    assert time.monotonic() - started < 60
    drainer._finish()
    assert _on_disk(spool.path) <= 1024**2, _on_disk(spool.path)


def test_a_full_disk_at_start_is_no_damage_the_node_stops_loudly(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """Any SQLite error at open counted as damage: a healthy spool on a full disk was set
    aside, and the worker ran with no spool and no drainer. Now only damage sets a spool
    aside; a full disk stops the node (exit 75, for systemd to start it again), loudly,
    taking nothing, its spool untouched."""
    mount = tmp_path / "fs"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        spool_dir = _spool_dir(mount)
        node = worker_node("full")
        statements = [video_statement("played", n) for n in range(50)]
        _spooled_before(spool_dir, node, statements)
        with (mount / "ballast").open("wb", buffering=0) as f:  # the disk full, to the last block
            for size in (65536, 4096, 512):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)
        with pod_producer(redis_srv.url()) as delay:
            delay(video_statement("played", 99))
        # batches of 5: a headroom of 1.3 MiB, which the 24 MiB filesystem has once freed
        config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_BATCH_SIZE=5)
        worker = start_worker(config, name="full", wait_ready=False)
        assert wait_for(lambda: worker.proc.poll() is not None, 60), worker.text()[-3000:]
        assert worker.proc.returncode == 75, worker.text()[-3000:]
        assert "cannot be opened" in worker.text()
        assert not list(spool_dir.glob("*.damaged-*")), list(spool_dir.iterdir())
        assert redis_srv.client().llen("xapi") == 1  # nothing taken
        (mount / "ballast").unlink()
        worker = start_worker(config, name="full")
        assert wait_for(lambda: len(ralph.stored()) == 51, 60), worker.text()[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _full_scans(plan_conn: sqlite3.Connection, traced: list[str]) -> list[str]:
    """The traced statements whose plan reads the whole table ``spool`` (or one of its
    indexes whole), and any integrity check (a read of every page)."""
    found = []
    for sql in traced:
        text = sql.strip()
        if re.match(r"PRAGMA\s+(quick|integrity)_check", text, re.IGNORECASE):
            found.append(text)
        if not re.match(r"(SELECT|UPDATE|DELETE|INSERT|WITH)\b", text, re.IGNORECASE):
            continue
        for row in plan_conn.execute("EXPLAIN QUERY PLAN " + text):
            if re.match(r"SCAN spool\b(?!_)", row[3]):
                found.append(f"{text[:120]} -> {row[3]}")
    return found


def test_no_scan_of_the_table_at_start_nor_idle_nor_while_it_changes(tmp_path, monkeypatch):
    """Before Celery's loop started, the worker ran quick_check (every page read) and
    count(*) on its spool (a cold open took 7.2 s at 394 MiB: minutes at the 10 GiB cap,
    inside WatchdogSec=60); the drainer counted the spool again after every change, and
    read the due rows in the order of the rows, a scan of the table every second while
    nothing was due. Every statement the spool runs at open, idle and while it changes is
    traced here (SQLite's statement trace), and none reads the table whole."""
    directory = _spool_dir(tmp_path)
    node = "scan@h"
    now = time.time()
    before = Spool(directory, node)
    before.open()
    for start in range(0, 2000, 500):  # parked for later: nothing due now
        before.add(
            [
                Entry(video_statement("played", n), f"t{n}", 2, now - n, now + 600, "HTTP 503")
                for n in range(start, start + 500)
            ]
        )
    before.close()
    plan_conn = sqlite3.connect(directory / node_file(node))
    traced: list[str] = []
    connect = sqlite3.connect

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(traced.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced_connect)
    spool = Spool(directory, node)
    assert spool.open() == []  # the worker's start
    stats = spool.stats()
    assert stats.depth == 2000 and stats.oldest == now - 1999
    for _ in range(3):  # idle: nothing due
        assert spool.due(100, now) == []
        spool.stats(counts=False)
        spool.stats()
    spool.add(
        [
            Entry(video_statement("played", 5000 + n), f"n{n}", 1, now - 5000, now)
            for n in range(100)
        ]
    )
    due = spool.due(100, now)
    assert len(due) == 100
    ahead = spool.due(100, now, exclude=[r.id for r in due])
    spool.reschedule([r.id for r in due[:10]], now + 60, "HTTP 503", lone_failures={due[0].id: 1})
    spool.delete([r.id for r in due[10:]])
    assert spool.stats().depth == 2010 and spool.stats().oldest == now - 5000
    spool.wake(now, beyond=3600)
    spool.reclaimable()
    spool.close()
    assert ahead == [] or all(r.id not in {d.id for d in due} for r in ahead)
    monkeypatch.undo()
    assert traced, "nothing traced"
    scans = _full_scans(plan_conn, traced)
    plan_conn.close()
    assert not scans, scans


def test_a_spool_of_a_newer_format_is_refused_and_kept_as_it_is(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """A downgrade: an older release met a spool of a newer format and set it aside as
    damaged (a new empty spool in its place, its statements out of every drain). A newer
    format is no damage: the node refuses to take (exit 75, as for a full disk), says why,
    and leaves the file as it is."""
    from xapi_worker.spool import SCHEMA_VERSION

    spool_dir = _spool_dir(tmp_path)
    node = worker_node("newer")
    _spooled_before(spool_dir, node, [video_statement("played", n) for n in range(5)])
    path = spool_dir / node_file(node)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    kept = path.read_bytes()
    with pod_producer(redis_srv.url()) as delay:
        delay(video_statement("played", 99))
    config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir)
    worker = start_worker(config, name="newer", wait_ready=False)
    assert wait_for(lambda: worker.proc.poll() is not None, 60), worker.text()[-3000:]
    assert worker.proc.returncode == 75, worker.text()[-3000:]
    assert f"newer than this worker's ({SCHEMA_VERSION})" in worker.text()
    assert not list(spool_dir.glob("*.damaged-*")), list(spool_dir.iterdir())
    assert path.read_bytes() == kept
    assert redis_srv.client().llen("xapi") == 1  # nothing taken
    listed = run_cli(config, "spool", "list")
    assert listed.returncode != 0 and "newer than this worker's" in listed.stderr
    assert path.read_bytes() == kept


def _damage_a_page(path: Path) -> None:
    """One leaf page of the table, in the middle of the file, overwritten (a bad sector)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    leaves = [
        r[0]
        for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'spool' AND pagetype = 'leaf' ORDER BY pageno"
        )
    ]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with path.open("r+b") as f:
        f.seek((leaves[len(leaves) // 2] - 1) * page_size)
        f.write(os.urandom(page_size))


def test_damage_met_while_draining_sets_the_file_aside_and_spool_drain_delivers_the_rest(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """A spool damaged on disk: the worker stops when SQLite meets the damage, its next start
    sets the file aside; the set-aside file is named, counted and dated by `status` and
    check_xapi (it used to say only "see the worker's log"), and `spool drain` delivers its
    readable rows, once (it used to see only the live spools), saying how many it could not
    read."""
    from test_check_xapi import broker_entry, check, write

    spool_dir = _spool_dir(tmp_path)
    node = worker_node("bad")
    statements = [video_statement("played", n, with_id=True) for n in range(400)]
    _spooled_before(spool_dir, node, statements)
    _damage_a_page(spool_dir / node_file(node))
    config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=spool_dir, XAPI_WORKER_BATCH_SIZE=20)
    worker = start_worker(config, name="bad")
    assert wait_for(lambda: worker.proc.poll() is not None, 60), worker.text()[-3000:]
    assert "is damaged: this node stops" in worker.text(), worker.text()[-3000:]
    delivered_before = set(ralph.stored_ids())
    assert 0 < len(delivered_before) < 400
    worker = start_worker(config, name="bad")  # the same log: its first run's ready line
    assert wait_for(lambda: worker.text().count(" ready.") == 2, 30), worker.text()[-3000:]
    assert "set aside as" in worker.text()
    (aside,) = Spool(spool_dir, node).damaged_files()
    state = wait_for_value(lambda: _status(config), lambda s: s["spool_damaged_files"], 15)
    assert state["spool_damaged"] == 1
    assert state["spool_damaged_files"] == [f"{node}: {aside.name}"]
    assert 0 <= state["spool_damaged_age_s"] < 120
    plugin = write(tmp_path, {"brokers": [broker_entry(redis_srv.port)], "nodes_expected": 1})
    result = check(plugin)
    assert result.state == "WARNING", result.line
    assert f"1 damaged spool files set aside on node {node}, the oldest " in result.text
    assert aside.name in result.text and "xapi-worker spool drain" in result.text
    drained = run_cli(config, "spool", "drain")
    assert drained.returncode == 75, drained.stdout + drained.stderr  # some rows unreadable
    match = re.search(
        r"(\d+) statements put in the node's spool, (\d+) rows unreadable",
        drained.stdout + drained.stderr,
    )
    assert match, drained.stdout + drained.stderr
    moved, unreadable = int(match[1]), int(match[2])
    # Rows delivered whose deletion met the damage are in the file still: sent again, stored once.
    assert 0 < unreadable < 20 and moved + unreadable >= 400 - len(delivered_before)
    assert wait_for(lambda: len(set(ralph.stored_ids())) == 400 - unreadable, 60)
    stored = ralph.stored_ids()
    assert len(stored) == len(set(stored)), "stored twice"
    assert set(stored) <= {s["id"] for s in statements}
    again = run_cli(config, "spool", "drain")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "put in the node's spool" not in again.stdout + again.stderr  # taken once
    state = wait_for_value(lambda: _status(config), lambda s: not s["spool_damaged_files"], 15)
    assert state["spool_damaged"] == 0 and state["spool_damaged_age_s"] is None
    assert len(set(ralph.stored_ids())) == 400 - unreadable


def _index_without_its_rows(path: Path, gone: int) -> None:
    """spool_due made to point at rows no longer in the table (the rows deleted while the
    index was detached from it): quick_check passes such a file, every read through the
    index says 'malformed'."""
    conn = sqlite3.connect(path, isolation_level=None)
    sql = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'spool_due'").fetchone()[0]
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute(
        "UPDATE sqlite_schema SET sql = replace(sql, 'ON spool', 'ON spool_depth'),"
        " tbl_name = 'spool_depth' WHERE name = 'spool_due'"
    )
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("DELETE FROM spool WHERE id <= ?", (gone,))
    conn.execute(
        "UPDATE sqlite_schema SET sql = ?, tbl_name = 'spool' WHERE name = 'spool_due'", (sql,)
    )
    conn.close()


def test_a_damaged_index_is_rebuilt_and_a_damage_met_again_sets_the_file_aside(tmp_path):
    """A damaged index passed the marker's quick_check: each start removed the marker, the
    first read through the index marked the file again and stopped the node, for ever, its
    rows stuck. Now the open after a damage rebuilds the indexes (the rows are read again),
    and a damage met again after such a clean check sets the file aside."""
    now = time.time()
    spool = Spool(tmp_path, "xapi@h")
    spool.open()
    spool.add(
        [Entry({"id": f"s{i}"}, "t", 1, now, now) for i in range(50)],
        now=now,
    )
    spool.close()
    _index_without_its_rows(spool.path, 10)
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        spool.due(100, now=now + 1)
    assert spool.check_pending()
    spool.close()
    spool = Spool(tmp_path, "xapi@h")
    assert spool.open() == []  # sound: kept, its indexes rebuilt
    assert not spool.check_pending()
    assert [r.statement["id"] for r in spool.due(100, now=now + 1)] == [
        f"s{i}" for i in range(10, 50)
    ]
    assert spool.stats().depth == 40
    # A damage met again after a clean check: set aside, no second check, no loop.
    spool.close()
    _index_without_its_rows(spool.path, 20)
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        spool.due(100, now=now + 1)
    spool.close()
    spool = Spool(tmp_path, "xapi@h")
    assert [p.name for p in spool.open() if not p.name.endswith(("-wal", "-shm"))] == [
        p.name for p in spool.damaged_files()
    ]
    assert len(spool.damaged_files()) == 1 and spool.stats().depth == 0
    assert not spool.check_pending()
    assert not Path(f"{spool.path}.checked").exists()


def test_the_watchdog_is_fed_while_the_spool_is_migrated_at_start(tmp_path, monkeypatch):
    """The migration from format 2 (a count and an index of every row) and the whole check
    after a damage run in the worker's start, before Celery's loop feeds systemd's watchdog
    (counted from the exec): 12 s for 1.2 GiB cold, minutes at the 10 GiB limit, and the
    worker was killed at each start. Now the open feeds it from a thread. The open is made
    to last here by a writer holding the file's lock (what a large file's migration costs)."""
    import socket
    import threading

    directory = _spool_dir(tmp_path)
    path = directory / node_file("old@host")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(
        """
        CREATE TABLE spool (
            id INTEGER PRIMARY KEY AUTOINCREMENT, statement_id TEXT NOT NULL,
            statement TEXT NOT NULL, task_id TEXT NOT NULL, attempts INTEGER NOT NULL,
            first_seen REAL NOT NULL, spooled_at REAL NOT NULL, next_at REAL NOT NULL,
            last_error TEXT NOT NULL DEFAULT '', lone_failures INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX spool_due ON spool (next_at, id);
        INSERT INTO spool VALUES (1, 's1', '{"id":"s1"}', 't1', 3, 1.0, 2.0, 3.0, '', 0);
        PRAGMA user_version = 2;
        """
    )
    address = str(tmp_path / "notify")
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(address)
    systemd.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "1500000")  # a ping every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    conn.execute("BEGIN IMMEDIATE")  # the migration waits for it: the open lasts 2.5 s
    release = threading.Timer(2.5, lambda: conn.execute("COMMIT"))
    release.start()
    try:
        spool = Spool(directory, "old@host")
        assert spool.open() == []
    finally:
        release.join()
        conn.close()
    pings = []
    with contextlib.suppress(TimeoutError):
        while True:
            pings.append(systemd.recv(64))
    systemd.close()
    assert pings.count(b"WATCHDOG=1") >= 3, pings
    assert spool.stats().depth == 1 and [r.statement for r in spool.rows()] == [{"id": "s1"}]
    spool.close()


def test_a_salvage_stopped_by_a_full_spool_says_the_rest_stays_in_the_set_aside_file(tmp_path):
    """It said they "stay in the broker": they stay in the set-aside file."""
    from xapi_worker.salvage import salvage

    now = time.time()
    source = Spool(tmp_path / "src", "xapi@h")
    (tmp_path / "src").mkdir(mode=0o700)
    source.open()
    source.add([Entry({"id": f"s{i}", "pad": "x" * 10_000}, "t", 1, now, now) for i in range(600)])
    source.close()
    aside = tmp_path / "xapi@h.sqlite3.damaged-20260101T000000Z"
    aside.write_bytes(source.path.read_bytes())
    node = Spool(tmp_path, "xapi@h", max_bytes=2 * 1024**2, batch_size=1)
    node.open()
    result = salvage(aside, node)
    assert "stay in the set-aside file" in result.error, result.line()
    assert "broker" not in result.error
    node.close()


def test_a_statement_made_of_its_id_takes_its_bound_once_in_a_row(tmp_path):
    """The row's ``statement_id`` column repeated the id whole: a statement within
    XAPI_WORKER_MAX_STATEMENT_KB made mostly of its id (a browser's, sent while the LRS is
    down: no 400 for it yet) counted about twice its bound in the row, so a batch of them was
    refused by add() while the spool was not full, the node taking, putting back, taking
    (review s6, L1). The column is cut: a row weighs its statement and the overhead."""
    from xapi_worker.spool import ID_COLUMN_CHARS, SpoolFull, min_max_bytes

    kb, batch = 16, 10
    limit = kb * 1024
    spool = Spool(
        tmp_path,
        "n@h",
        max_bytes=min_max_bytes(batch, limit),
        batch_size=batch,
        statement_bytes=limit,
    )
    spool.open(exclusive=True)
    try:
        now = time.time()
        filler = {
            "actor": {"mbox": "mailto:a@example.org"},
            "verb": {"id": "v"},
            "pad": "p" * 12000,
        }
        n = 0
        # Up to just above one headroom of room: the node still takes (not full).
        while (stats := spool.stats()).room >= stats.headroom + 3 * 30_000:
            spool.add([Entry(dict(filler, n=n), f"t{n}", 1, now, now)])
            n += 1
        stats = spool.stats()
        assert not stats.full and stats.room >= stats.headroom
        hostile = {"id": "x" * (limit - 200), "actor": {"mbox": "mailto:a@example.org"}}
        try:
            spool.add([Entry(dict(hostile), f"h{j}", 1, now, now) for j in range(batch)])
        except SpoolFull as exc:
            pytest.fail(f"a batch within the limit refused while the node takes: {exc}")
        with sqlite3.connect(spool.path) as conn:
            ids = [
                r[0] for r in conn.execute("SELECT statement_id FROM spool WHERE task_id LIKE 'h%'")
            ]
        assert ids == ["x" * ID_COLUMN_CHARS] * batch
        # the statement itself keeps its id whole
        kept = [r.statement["id"] for r in spool.rows() if r.task_id.startswith("h")]
        assert kept == [hostile["id"]] * batch
    finally:
        spool.close()
