"""The spool's move (plugins/modules/xapi_spool_move.py) run as Ansible runs it, on a spool in
a temporary directory, without a playbook (tests/test_spool_migration.py runs the role's
tasks): root copies only what the worker would have made, and says why it refuses the rest.

Stand-ins: the worker's user is root, Pod's user `nobody`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "plugins/modules/xapi_spool_move.py"
POD = "nobody"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def move(
    spool: Path, tmp_path: Path, max_mb: int = 0, file_size_limit: int | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    args = tmp_path / "args.json"
    args.write_text(
        json.dumps(
            {
                "ANSIBLE_MODULE_ARGS": {
                    "path": str(spool),
                    "from_user": POD,
                    "owner": "root",
                    "group": "root",
                    "max_mb": max_mb,
                }
            }
        )
    )

    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    run = subprocess.run(
        [sys.executable, str(MODULE), str(args)],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=limit,
    )
    try:
        result = json.loads(run.stdout)
    except json.JSONDecodeError:
        result = {}
    return run, result


def spool_of(tmp_path: Path, files: dict[str, bytes]) -> Path:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    pod = pwd.getpwnam(POD)
    for name, content in files.items():
        (spool / name).write_bytes(content)
        os.chown(spool / name, pod.pw_uid, pod.pw_gid)
    return spool


def owners(spool: Path) -> dict[str, int]:
    return {p.name: p.stat().st_uid for p in spool.iterdir()}


def test_the_rule_holds_every_name_the_worker_gives(tmp_path: Path) -> None:
    """The module's rule (WORKER_NAME) is a copy of the worker's (spool.py, which Ansible's
    python cannot import): every name spool.py makes passes it, nothing else."""
    sys.path.insert(0, str(ROOT / "xapi_worker/src"))
    try:
        from xapi_worker import spool
    finally:
        sys.path.remove(str(ROOT / "xapi_worker/src"))
    found = importlib.util.spec_from_file_location("xapi_spool_move", MODULE)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    node = spool.Spool(tmp_path, "xapi@enc-1.example.org 2")
    damaged = node._free_set_aside_name()
    names = [
        node.path.name,
        *(f"{node.path.name}{end}" for end in ("-wal", "-shm")),
        node._lock_path.name,
        node._check_mark.name,
        node._checked_mark.name,
        f"{node.path.name}{spool.SETTING_ASIDE}",
        *(f"{damaged.name}{end}" for end in ("", "-wal", "-shm")),
        *(f"{damaged.name}{spool.SALVAGED}{end}" for end in ("", "-wal", "-shm")),
    ]
    assert [n for n in names if not module.worker_name(n)] == []
    others = ["video.mp4", "xapi.sqlite3~", "a/b.sqlite3", "x.sqlite3.damaged-2026", ".bashrc"]
    assert [n for n in others if module.worker_name(n)] == []


def test_a_file_the_worker_would_not_name_so_is_refused(tmp_path: Path) -> None:
    """Every regular file of Pod's was copied whatever its name: a mistyped spool directory
    (one of Pod's, flat) was taken whole (session 5's review, L2)."""
    spool = spool_of(tmp_path, {"xapi.sqlite3": b"rows", "video.mp4": b"media"})
    run, result = move(spool, tmp_path)
    assert result.get("failed"), run.stdout + run.stderr
    assert result["msg"] == (
        f"Refused: {spool}/video.mp4: not named like a file of the worker's spool. "
        "Nothing was moved."
    )
    assert set(owners(spool).values()) == {pwd.getpwnam(POD).pw_uid}


def test_a_file_over_the_spools_limit_is_refused_before_any_copy(tmp_path: Path) -> None:
    """A file larger than a node's spool may grow is not copied (nor any other)."""
    spool = spool_of(tmp_path, {"a.sqlite3": b"rows", "b.sqlite3": b"\1" * (1024**2 + 1)})
    run, result = move(spool, tmp_path, max_mb=1)
    assert result.get("failed"), run.stdout + run.stderr
    assert result["msg"] == (
        f"Refused: {spool}/b.sqlite3: 1048577 bytes, more than a node's spool may hold "
        "(1048576 bytes). Nothing was moved."
    )
    assert set(owners(spool).values()) == {pwd.getpwnam(POD).pw_uid}


def test_a_sparse_file_is_refused_before_any_copy(tmp_path: Path) -> None:
    """A sparse file of Pod's (`truncate -s 1T`) was written out whole by root, zeros until
    the filesystem was full, root's reserve included (session 5's review, L2)."""
    spool = spool_of(tmp_path, {"a.sqlite3": b"rows", "b.sqlite3": b""})
    os.truncate(spool / "b.sqlite3", 8 * 1024**2)
    run, result = move(spool, tmp_path)
    assert result.get("failed"), run.stdout + run.stderr
    assert result["msg"] == (
        f"Refused: {spool}/b.sqlite3: a sparse file (holes), not one the worker wrote. "
        "Nothing was moved."
    )
    assert set(owners(spool).values()) == {pwd.getpwnam(POD).pw_uid}


def test_a_copy_that_fails_is_a_refusal_naming_the_file(tmp_path: Path) -> None:
    """An error while a file is copied (here the size limit of the module's process, as a
    full disk would) was a traceback; now the module's refusal, naming the file, the file left
    as it was, the files before it moved, no copy left behind."""
    content = b"\1" * (2 * 1024**2)  # two reads of the copy: a short write, then an error
    spool = spool_of(tmp_path, {"a.sqlite3": b"rows", "b.sqlite3": content})
    run, result = move(spool, tmp_path, file_size_limit=4096)
    assert result.get("failed"), run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert str(result["msg"]).startswith(
        f"Refused: {spool}/b.sqlite3: its copy failed, left as it was ("
    ), result
    assert result["moved"] == ["a.sqlite3"]
    assert owners(spool) == {"a.sqlite3": 0, "b.sqlite3": pwd.getpwnam(POD).pw_uid}
    assert (spool / "b.sqlite3").read_bytes() == content
