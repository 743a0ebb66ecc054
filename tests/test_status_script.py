"""playbooks/status.yml's script (roles/xapi_ops/tasks/status.yml), run by bash with a stand-in
worker: it reports the check's exit status and last line, and writes no temporary file (it
used /tmp/xapi-check.$$, a name another user can make first: security review, round two,
finding 6)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import jinja2
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "roles/xapi_ops/tasks/status.yml"

WORKER = """#!/bin/sh
case "$1" in
  status) echo "queue 3" ;;
  check) echo "first line"; echo "XAPI CRITICAL - no worker consumes"; exit 2 ;;
esac
"""


def status_script() -> str:
    tasks = yaml.safe_load(TASKS.read_text())
    task = next(t for t in tasks if "ansible.builtin.shell" in t)
    return task["ansible.builtin.shell"]["cmd"]


def test_the_script_names_no_temporary_file() -> None:
    assert "/tmp" not in status_script()


def test_the_check_exit_and_last_line_are_reported(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("xapi-worker", "celery"):
        (venv / "bin" / name).write_text(WORKER)
        (venv / "bin" / name).chmod(0o755)
    env_file = tmp_path / "broker.env"
    env_file.write_text("XAPI_BROKER=x\n")
    # A shell script, not HTML: nothing to escape.
    jinja = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701
    jinja.filters["quote"] = shlex.quote
    script = jinja.from_string(status_script()).render(
        item={"env": str(env_file)},
        xapi_ops_worker={"venv": str(venv), "dir": str(tmp_path)},
    )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    result = subprocess.run(
        ["/bin/bash", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "check-exit=2" in result.stdout.splitlines(), result.stdout
    assert "check-line=XAPI CRITICAL - no worker consumes" in result.stdout.splitlines()
    assert list(tmp.iterdir()) == []
