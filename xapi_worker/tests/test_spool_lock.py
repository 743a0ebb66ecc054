"""A node's spool is opened, checked and set aside only by the process that holds it (review
of the worker, M1 and L1): a second opener (``xapi-worker spool drain``, a restarting node)
is refused while a worker holds the file; a set-aside never overwrites another; a kill -9
between its renames loses no row, and one killed mid-salvage takes no row twice."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import run_cli
from xapi_testsupport.statements import video_statement
from xapi_worker.salvage import salvage
from xapi_worker.spool import CHECK_MARK, CHECKED_MARK, Entry, Spool, SpoolError, SpoolHeld


def _entries(first: int, count: int) -> list[Entry]:
    now = time.time()
    return [
        Entry(video_statement("played", n), f"t{n}", 1, now, now)
        for n in range(first, first + count)
    ]


def _count(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])
    finally:
        conn.close()


def _mark_damage_met_again(spool: Spool) -> None:
    Path(f"{spool.path}{CHECK_MARK}").touch()
    Path(f"{spool.path}{CHECKED_MARK}").touch()


def test_a_second_opener_cannot_set_aside_the_file_a_worker_still_writes(tmp_path):
    """`spool drain` (or a restarting node) opened the live file of a node still writing it
    (its warm shutdown), set it aside and salvaged it to `.salvaged`: the rows the worker
    committed afterwards (their messages acknowledged) went only to that file, which nothing
    drains. Now only the holder of the spool's lock checks or sets aside: a second opener
    reads and writes the file as it is, or, a node, is refused."""
    worker = Spool(tmp_path, "n")
    worker.open(exclusive=True)
    worker.add(_entries(0, 3))
    _mark_damage_met_again(worker)
    other = Spool(tmp_path, "n")
    assert other.open() == []  # `spool drain`: the file as it is
    with pytest.raises(SpoolHeld):
        Spool(tmp_path, "n").open(exclusive=True)  # a second node
    worker.add(_entries(10, 5))
    assert worker.damaged_files() == []
    assert other.stats().depth == 8
    other.close()
    worker.close()
    again = Spool(tmp_path, "n")
    again.open(exclusive=True)  # the worker gone: the next opener does the set-aside
    [aside] = again.damaged_files()
    assert _count(aside) == 8
    result = salvage(aside, again)
    assert result.moved == 8 and not result.error
    assert again.stats().depth == 8
    again.close()


def test_two_set_asides_within_one_second_keep_both_files(tmp_path, monkeypatch):
    """Set-aside names were by the second and `rename` replaced an existing one: two
    set-asides within one second unlinked the first file (7 rows gone)."""
    real_gmtime, second = time.gmtime, time.time()
    monkeypatch.setattr(time, "gmtime", lambda *when: real_gmtime(*(when or (second,))))
    first = Spool(tmp_path, "n")
    first.open()
    first.add(_entries(0, 7))
    first.close()
    for _ in range(2):
        spool = Spool(tmp_path, "n")
        _mark_damage_met_again(spool)
        spool.open()
        spool.close()
    aside = Spool(tmp_path, "n").damaged_files()
    assert len(aside) == 2
    assert sorted(_count(p) for p in aside) == [0, 7]


def _set_aside_killed_at_the_second_move(directory: Path) -> None:
    """In a child: 50 rows committed to the WAL (another connection keeps it from being
    checkpointed), a damage met again, and the set-aside killed (-9) at its second move of
    a file."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9, status
        return
    try:
        spool = Spool(directory, "n")
        spool.open()
        keeper = sqlite3.connect(spool.path)  # the WAL stays: it is not the last connection
        keeper.execute("SELECT count(*) FROM spool").fetchone()
        spool.add(_entries(0, 50))
        spool.close()
        assert Path(f"{spool.path}-wal").stat().st_size > 0
        _mark_damage_met_again(spool)
        moves = {"n": 0}
        real_link, real_rename = os.link, os.rename

        def killed_at_second(real):
            def move(*args, **kwargs):
                moves["n"] += 1
                if moves["n"] == 2:
                    os._exit(9)
                return real(*args, **kwargs)

            return move

        os.link, os.rename = killed_at_second(real_link), killed_at_second(real_rename)
        Spool(directory, "n").open()
    finally:
        os._exit(1)


def test_a_kill_between_the_renames_of_a_set_aside_loses_no_row(tmp_path):
    """The set-aside renamed the file first, then its `-wal`: killed in between, the next
    open started a new file beside the old WAL, which SQLite dropped, and the set-aside file
    lacked every row still in it (50 here: salvage found no table). Now the moves are
    journaled, the WAL first, and the next open finishes them."""
    _set_aside_killed_at_the_second_move(tmp_path)
    spool = Spool(tmp_path, "n")
    spool.open()
    target = Spool(tmp_path, "x")
    target.open()
    moved = sum(salvage(p, target).moved for p in spool.damaged_files())
    assert moved == 50
    assert target.stats().depth == 50
    spool.close()
    target.close()


def test_spool_drain_leaves_the_file_its_running_node_holds(
    tmp_path, redis_srv, ralph, make_config
):
    """`xapi-worker spool drain` checked (damage marked: set aside and salvaged) the file a
    running node writes. Now, the node holding the spool, it delivers the rows beside the
    node and leaves the file as it is: the node's own to check."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    config = make_config(ralph.url, XAPI_WORKER_SPOOL_DIR=str(spool_dir))
    node = Spool(spool_dir, "held@host")  # as the node's main process holds it
    node.open(exclusive=True)
    statements = [video_statement("played", n) for n in range(30)]
    now = time.time()
    node.add([Entry(s, f"t{n}", 2, now, now) for n, s in enumerate(statements)])
    _mark_damage_met_again(node)
    inode = node.path.stat().st_ino
    done = run_cli(config, "spool", "drain")
    assert done.returncode == 0, done.stdout + done.stderr
    assert node.path.stat().st_ino == inode
    assert node.damaged_files() == []
    assert sorted(ralph.stored_ids()) == sorted(s["id"] for s in statements)
    assert node.stats().depth == 0
    node.close()


def _set_aside_file(directory: Path, rows: int) -> Path:
    source = Spool(directory, "src")
    source.open()
    for first in range(0, rows, 400):
        source.add(_entries(first, min(400, rows - first)))
    source.close()
    target = directory / "n.sqlite3.damaged-20260101T000000Z"
    (directory / "src.sqlite3").rename(target)
    return target


def _salvage_killed_after(directory: Path, path: Path, commits: int) -> None:
    """In a child: salvage ``path`` into node n's spool, killed (-9) right after its
    ``commits``-th chunk is committed."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        spool = Spool(directory, "n")
        spool.open()
        real_add, done = spool.add, {"n": 0}

        def add(*args, **kwargs):
            real_add(*args, **kwargs)
            done["n"] += 1
            if done["n"] >= commits:
                os._exit(9)

        spool.add = add  # type: ignore[method-assign]
        salvage(path, spool)
    finally:
        os._exit(1)


@settings(max_examples=8, deadline=None, database=None)
@given(rows=st.integers(1, 1600), commits=st.integers(1, 4))
def test_a_salvage_killed_between_chunks_and_run_again_takes_each_row_once(
    tmp_path_factory, rows, commits
):
    """`spool drain` killed mid-salvage (chunks committed one by one, the file renamed at
    the end) salvaged the file again from its first row: every row of the committed chunks
    twice in the spool (review of the worker, L4). Their progress is now committed with
    them: the second salvage takes the rest, each row once."""
    directory = tmp_path_factory.mktemp("salvage")
    path = _set_aside_file(directory, rows)
    _salvage_killed_after(directory, path, commits)
    spool = Spool(directory, "n")
    spool.open()
    for aside in spool.damaged_files():
        result = salvage(aside, spool)
        assert not result.error, result.line()
    ids = [r.statement["id"] for r in spool.rows(-1)]
    assert len(ids) == rows and len(set(ids)) == rows
    assert spool.damaged_files() == []
    spool.close()


def test_a_trigger_planted_in_the_file_runs_nothing_unsafe(tmp_path: Path) -> None:
    """A spool file left by another user (Pod's, before the spool became the worker's user's:
    the first Ansible review, L1) may carry a trigger of its own. The worker's connections do
    not trust the file's schema (``trusted_schema`` off): a trigger using what SQLite does not
    mark harmless (here a ``pragma_*`` table) fails instead of running as the worker's user,
    and nothing is written."""
    first = Spool(tmp_path, "xapi@enc")
    first.open()
    first.close()
    planted = sqlite3.connect(first.path)
    planted.execute("CREATE TABLE seen (file TEXT)")
    planted.execute(
        "CREATE TRIGGER planted AFTER INSERT ON spool"
        " BEGIN INSERT INTO seen SELECT file FROM pragma_database_list; END"
    )
    planted.commit()
    planted.close()
    spool = Spool(tmp_path, "xapi@enc")
    spool.open()
    try:
        with pytest.raises(SpoolError, match="unsafe use of virtual table"):
            spool.add(_entries(0, 1))
    finally:
        spool.close()
    assert _count(first.path) == 0
    conn = sqlite3.connect(first.path)
    try:
        assert conn.execute("SELECT count(*) FROM seen").fetchone() == (0,)
    finally:
        conn.close()
