"""tools/run-tests.sh, the runner of `make test`: stages TEST_JOBS at a time, every stage run
whatever the others did, the counts and failed tests summed up at the end, exit code 0 only
when nothing failed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, *stages: str, jobs: str = "2") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TEST_JOBS=jobs, TEST_LOG_DIR=str(tmp_path / "logs"))
    return subprocess.run(
        ["bash", str(ROOT / "tools/run-tests.sh"), *stages],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_every_stage_runs_and_the_summary_counts_them(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "pytest-like=echo '3 passed in 1s'",
        "broken=echo 'FAILED t.py::test_x - boom'; echo '1 failed, 2 passed'; exit 1",
        "converge-only=exit 2",
        "plain=true",
    )
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert lines[-1] == "summary: 6 passed, 2 failed"
    assert "broken: FAILED t.py::test_x - boom" in lines
    # Each stage's own lines carry its name; its whole log is kept.
    assert "[pytest-like] 3 passed in 1s" in lines
    assert (tmp_path / "logs/broken.log").read_text().startswith("FAILED t.py::test_x")
    table = lines[lines.index(next(line for line in lines if line.startswith("=== stages"))) :]
    assert [line.split()[0] for line in table[1:-1]] == [
        "pytest-like",
        "broken",
        "converge-only",
        "plain",
    ]
    assert "rc=2" in table[3]


def test_two_stages_run_at_once(tmp_path: Path) -> None:
    """Each stage waits for the other to have started: one at a time would never end, so the
    stages give up after 20 s and fail."""
    marks = tmp_path / "marks"
    marks.mkdir()
    wait = "for i in $(seq 200); do [ -e {0}/{1} ] && exit 0; sleep 0.1; done; exit 1"
    result = run(
        tmp_path,
        f"a=touch {marks}/a; {wait.format(marks, 'b')}",
        f"b=touch {marks}/b; {wait.format(marks, 'a')}",
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1] == "summary: 2 passed, 0 failed"


def test_a_bad_job_count_is_refused(tmp_path: Path) -> None:
    result = run(tmp_path, "a=true", jobs="two")
    assert result.returncode == 2
    assert "TEST_JOBS must be a positive number, not 'two'" in result.stderr
