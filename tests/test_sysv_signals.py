"""sysv: Celery's init script reads, as root, the pid files the workers' user writes and
signals those pids as root (`status`: kill -0; `graceful`: kill -HUP). A pid file planted by
that user would have root signal any process (issue 34's review, L3). The defaults file the
script sources now gives it a `kill` that signals a pid only if the process is the workers'
user's (every uid) and a celery one.

The defaults file is rendered by Ansible from the roles' defaults (sysv), then sourced by
/bin/sh as the init script does, here as root. Stand-in for the workers' user: `daemon`.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from xapi_testsupport import playbooks

ROOT = Path(__file__).resolve().parents[1]
WORKER = "daemon"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs processes as another user")


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sysv-defaults")
    files = [
        ROOT / "roles/xapi/defaults/main.yml",
        ROOT / "roles/xapi_encodage_pod/defaults/main.yml",
        ROOT / "roles/xapi_encodage/defaults/main.yml",
        ROOT / "roles/xapi_encodage/vars/main.yml",
    ]
    template = str(ROOT / "roles/xapi_encodage/templates/celeryd-xapi.default.j2")
    extra = {
        "xapi_broker_password": "a-good-broker-password",
        "xapi_broker_host": "broker.example.org",
        "xapi_encodage_service_manager": "sysv",
        "xapi_encodage_worker_user": WORKER,
        "xapi_encodage_worker_group": WORKER,
    }
    result = playbooks.render(out, {template: "default"}, files, extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return out / "localhost-default"


def start(argv: list[str], user: str | None) -> subprocess.Popen[bytes]:
    prefix = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups"] if user else []
    return subprocess.Popen([*prefix, *argv])


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """A celery-looking process of the workers' user, one of root, one of the workers' user
    that is no celery."""
    sleeper = "import sys, time; time.sleep(60)"
    found = {
        "worker": start(["python3", "-c", sleeper, "-m", "celery", "worker"], WORKER),
        "root": start(["python3", "-c", sleeper, "-m", "celery", "worker"], None),
        "other": start(["python3", "-c", sleeper], WORKER),
    }
    time.sleep(0.5)
    try:
        yield found
    finally:
        for process in found.values():
            process.kill()
            process.wait()


def kill_as_the_script(defaults: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-e", "-c", f'. "{defaults}"; kill "$@"', "sh", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_status_signals_only_the_workers_processes(
    defaults: Path, processes: dict[str, subprocess.Popen[bytes]]
) -> None:
    assert kill_as_the_script(defaults, "-0", str(processes["worker"].pid)).returncode == 0
    for name in ("root", "other"):
        run = kill_as_the_script(defaults, "-0", str(processes[name].pid))
        assert run.returncode != 0, name
        assert "not signalled" in run.stderr, run.stderr
    assert kill_as_the_script(defaults, "-0", "1").returncode != 0


def test_a_planted_pid_gets_no_hangup(
    defaults: Path, processes: dict[str, subprocess.Popen[bytes]]
) -> None:
    """`graceful` with a pid file naming a root process: nothing is signalled, not even the
    worker's pid given beside it."""
    root, worker = processes["root"], processes["worker"]
    run = kill_as_the_script(defaults, "-HUP", str(worker.pid), str(root.pid))
    assert run.returncode != 0
    time.sleep(0.3)
    assert root.poll() is None and worker.poll() is None
    run = kill_as_the_script(defaults, "-TERM", str(worker.pid))
    assert run.returncode == 0, run.stderr
    assert worker.wait(timeout=5) == -signal.SIGTERM


def read_as_the_script(defaults: Path, pid_file: Path) -> subprocess.CompletedProcess[str]:
    """The script's own read of a pid file (check_status, _get_pids), as root, its memory
    bounded here so that the old `cat` of /dev/zero fails the test instead of the machine."""
    return subprocess.run(
        [
            "/bin/sh",
            "-e",
            "-c",
            f'ulimit -v 262144; . "{defaults}"; '
            'read_pid() { local pid=`cat "$1"`; echo "[$pid]"; }; read_pid "$1"',
            "sh",
            str(pid_file),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_pid_files_are_read_with_bounds(defaults: Path, tmp_path: Path) -> None:
    """A FIFO in place of a pid file hung root's `cat` (and every `status`, so every Ansible
    run); a link to /dev/zero grew root's shell until the memory ran out (session 5's review,
    M2). Only a short regular file of the workers' user is read."""
    uid = pwd.getpwnam(WORKER).pw_uid
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    good = pid_dir / "good.pid"
    good.write_text("1234\n")
    fifo = pid_dir / "fifo.pid"
    os.mkfifo(fifo)
    zero = pid_dir / "zero.pid"
    zero.symlink_to("/dev/zero")
    long = pid_dir / "long.pid"
    long.write_text("1" * 4096)
    for path in (good, fifo, zero, long):
        os.lchown(path, uid, -1)
    foreign = pid_dir / "root.pid"
    foreign.write_text("1\n")
    assert read_as_the_script(defaults, good).stdout == "[1234]\n"
    for path in (fifo, zero, long, foreign):
        run = read_as_the_script(defaults, path)
        assert run.stdout == "[]\n", (path.name, run.stdout[:200], run.stderr[-500:])
        assert "not read" in run.stderr, (path.name, run.stderr[-500:])
