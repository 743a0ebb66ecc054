"""The benchmark's hosts from the controller: commands in a podman container, and timed
ansible-playbook runs with the changed count of their recap."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


class PodmanHost:
    """What xapi_testsupport.pod_on_host needs of a testinfra host: run(cmd)."""

    def __init__(self, container: str) -> None:
        self.container = container

    def run(self, cmd: str, timeout: float = 1800) -> Result:
        done = subprocess.run(
            ["podman", "exec", self.container, "sh", "-c", cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def check(self, cmd: str, timeout: float = 1800) -> str:
        result = self.run(cmd, timeout)
        if result.rc != 0:
            raise RuntimeError(f"{self.container}: {cmd!r} failed: {result.stderr[-2000:]}")
        return result.stdout


@dataclass
class PlaybookRun:
    name: str
    seconds: float
    changed: int
    log: str


RECAP = re.compile(r"^\S+\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def playbook(name: str, log_dir: Path, *args: str) -> PlaybookRun:
    """Runs ansible-playbook (from the repository root), its output in log_dir/name.log, and
    fails on a failed or unreachable host: a benchmark of a broken deployment means nothing."""
    log = log_dir / f"{name}.log"
    env = dict(os.environ, ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks")
    started = time.monotonic()
    with log.open("w") as out:
        rc = subprocess.run(
            ["ansible-playbook", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env
        ).returncode
    seconds = time.monotonic() - started
    recap = RECAP.findall(log.read_text())
    if rc != 0 or not recap or any(int(u) or int(f) for _, u, f in recap):
        raise RuntimeError(f"ansible-playbook {' '.join(args)} failed (rc {rc}), see {log}")
    changed = sum(int(c) for c, _, _ in recap)
    shown = log.relative_to(REPO) if log.is_relative_to(REPO) else log
    return PlaybookRun(name, round(seconds, 1), changed, str(shown))
