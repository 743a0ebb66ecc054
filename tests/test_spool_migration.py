"""The spool's move to the worker's user (roles/xapi_encodage/tasks/migrate_user.yml), run
for real on this machine against a spool in a temporary directory: every entry is looked at
on every run, whatever the directory's owner (a run interrupted after the directory changed
hands finishes on the next), and an entry the worker would not own alone (a hard link, a
foreign file) stops the run, named, before any change.

Stand-ins: the worker's user is the test's (root), Pod's user `nobody`; no worker unit
exists here, so nothing is stopped.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles/xapi_encodage"
POD = "nobody"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def migrate(
    spool: Path, tmp_path: Path, worker: str | None = None
) -> subprocess.CompletedProcess[str]:
    me = pwd.getpwnam(worker) if worker else pwd.getpwuid(os.geteuid())
    playbook = tmp_path / "migrate.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars_files": [str(ROLE / "vars/main.yml")],
                    "tasks": [
                        {"ansible.builtin.import_tasks": str(ROLE / "tasks/migrate_user.yml")}
                    ],
                    "vars": {
                        "xapi_encodage_spool_enabled": True,
                        "xapi_encodage_worker_app": "xapi_worker",
                        "xapi_encodage_spool_dir": str(spool),
                        "xapi_encodage_worker_user": me.pw_name,
                        "xapi_encodage_worker_group": me.pw_name,
                        "xapi_encodage_pod_user": POD,
                        "xapi_encodage_spool_max_mb": 0,
                    },
                }
            ]
        )
    )
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
    )
    return subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", str(playbook)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def pods_file(path: Path) -> Path:
    path.write_text("rows")
    pod = pwd.getpwnam(POD)
    os.chown(path, pod.pw_uid, pod.pw_gid)
    return path


def test_an_interrupted_move_finishes_on_the_next_run(tmp_path: Path) -> None:
    """The directory already the worker's, a file still Pod's: the file is moved over."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    node = pods_file(spool / "xapi.sqlite3")
    run = migrate(spool, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert node.stat().st_uid == os.geteuid()


def test_a_hard_link_stops_the_run_named(tmp_path: Path) -> None:
    """A file of Pod's with a second link: the run fails, naming it, and changes nothing."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    pod = pwd.getpwnam(POD)
    os.chown(spool, pod.pw_uid, pod.pw_gid)
    node = pods_file(spool / "xapi.sqlite3")
    os.link(node, tmp_path / "elsewhere")
    run = migrate(spool, tmp_path)
    assert run.returncode != 0
    assert f"{node} (regular file, 2 links, owner {POD})" in run.stdout
    assert spool.stat().st_uid == pod.pw_uid
    assert node.stat().st_uid == pod.pw_uid


@pytest.mark.parametrize("name", [".xapi-move.junk", ".xapi-move.xapi.sqlite3"])
def test_a_file_of_pods_named_like_the_moves_own_is_refused(tmp_path: Path, name: str) -> None:
    """A file of Pod's named like the move's new files was skipped: never moved, the move
    due (the workers stopped) on every run; named after a spool file, the copy crashed on it
    (session 5's review, L1). Refused now, naming it, before anything is copied."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    node = pods_file(spool / "xapi.sqlite3")
    planted = pods_file(spool / name)
    run = migrate(spool, tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert f"Refused: {spool}/{name}: named like the move's own new files" in output, output
    assert "Traceback" not in output, output[-3000:]
    assert node.stat().st_uid == planted.stat().st_uid == pwd.getpwnam(POD).pw_uid


def test_a_leftover_of_roots_is_removed_and_the_move_done(tmp_path: Path) -> None:
    """A run cut between the new file's creation and its fchown left it root's: it stood
    where the copy is made (FileExistsError, a traceback, on every run)."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    node = pods_file(spool / "xapi.sqlite3")
    leftover = spool / ".xapi-move.xapi.sqlite3"
    leftover.write_text("half")
    os.chown(leftover, 0, 0)
    run = migrate(spool, tmp_path, worker="daemon")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert node.stat().st_uid == pwd.getpwnam("daemon").pw_uid and node.read_text() == "rows"
    assert not leftover.exists()


def test_a_foreign_entry_once_moved_is_reported_not_refused(tmp_path: Path) -> None:
    """The directory the worker's and nothing of Pod's in it: an entry the worker would not
    own alone (here a link the worker's user could make) stopped every run, so the worker's
    user could keep every fix from the host (the first Ansible review, L8). Root does nothing
    with it: reported, the run goes on, nothing changed. With a move due, it is refused."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    stray = spool / "xapi.sqlite3"
    stray.symlink_to("/etc/shadow")
    run = migrate(spool, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "changed=0" in run.stdout and "failed=0" in run.stdout, run.stdout[-3000:]
    said = " ".join(run.stdout.split())
    assert f"Warning: {spool} holds entries the worker would not own alone: {stray} (sym" in said
    pods_file(spool / "other.sqlite3")
    due = migrate(spool, tmp_path)
    assert due.returncode != 0
    assert f"{stray} (symbolic link, 1 links, owner" in due.stdout
    assert (spool / "other.sqlite3").stat().st_uid == pwd.getpwnam(POD).pw_uid


def test_a_mistyped_spool_directory_of_pods_is_not_taken(tmp_path: Path) -> None:
    """A flat directory of Pod's named as the spool (a typo): its files were given to the
    worker's user whatever their names, and the directory too (session 5's review, L2).
    Refused before any change, the file named."""
    media = tmp_path / "media"
    media.mkdir(mode=0o755)
    pod = pwd.getpwnam(POD)
    os.chown(media, pod.pw_uid, pod.pw_gid)
    video = pods_file(media / "video.mp4")
    run = migrate(media, tmp_path)
    assert run.returncode != 0
    assert f"Refused: {video}: not named like a file of the worker's spool" in run.stdout
    assert media.stat().st_uid == video.stat().st_uid == pod.pw_uid


def test_pods_open_descriptor_reaches_nothing_after_the_move(tmp_path: Path) -> None:
    """Pod's user opened its spool file before the move and keeps the descriptor (issue 34's
    review, H3): the file was chowned in place, so that descriptor still read the statements
    and wrote rows the worker would then send. Now the spool holds a new file (another inode,
    the same content, the worker's), and what is written through the old descriptor reaches
    nothing the worker reads."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    pod = pwd.getpwnam(POD)
    os.chown(spool, pod.pw_uid, pod.pw_gid)
    node = pods_file(spool / "xapi.sqlite3")
    node.chmod(0o600)
    before = node.stat()
    kept = os.open(node, os.O_RDWR)
    try:
        run = migrate(spool, tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        os.pwrite(kept, b"forged", 0)
        assert os.fstat(kept).st_uid == pod.pw_uid
    finally:
        os.close(kept)
    after = node.stat()
    assert after.st_ino != before.st_ino
    assert node.read_text() == "rows"
    assert (after.st_uid, after.st_mode & 0o7777, after.st_nlink) == (os.geteuid(), 0o600, 1)
    assert sorted(p.name for p in spool.iterdir()) == ["xapi.sqlite3"]
    # A second run finds nothing of Pod's user's: nothing changes.
    again = migrate(spool, tmp_path)
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout


def test_a_sqlite_spool_with_its_journal_moves_whole(tmp_path: Path) -> None:
    """A node's SQLite file as a killed worker leaves it (its -wal holding the last rows):
    every file is copied, and the database reads the same rows after the move."""
    import sqlite3

    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    path = spool / "xapi.sqlite3"
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT)")
    writer.executemany("INSERT INTO rows (body) VALUES (?)", [(f"s{i}",) for i in range(500)])
    writer.commit()
    # The files as a killed worker leaves them: copied aside while the connection is open.
    names = sorted(p.name for p in spool.iterdir())
    assert "xapi.sqlite3-wal" in names
    left = {name: (spool / name).read_bytes() for name in names}
    writer.close()
    for name, content in left.items():
        (spool / name).write_bytes(content)
    pod = pwd.getpwnam(POD)
    for entry in [spool, *spool.iterdir()]:
        os.chown(entry, pod.pw_uid, pod.pw_gid)
    run = migrate(spool, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert all(p.stat().st_uid == os.geteuid() for p in spool.iterdir())
    reader = sqlite3.connect(path)
    try:
        assert reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert reader.execute("SELECT count(*) FROM rows").fetchone() == (500,)
    finally:
        reader.close()
