"""The probe's reading half (roles/xapi/tasks/probe.yml) runs on an encoding host as its
worker's user. With the bundled worker it fell back to Pod's venv when the worker's was
missing, run as the worker's user: Pod's user can write that venv (a `.pth` planted there runs
in any of its interpreters), so a foothold as Pod's user ran code as the worker's user, which
holds the LRS and broker passwords (issue 34's review, L2). Now the reader's interpreter goes
with its user: the bundled worker's venv for the bundled worker's user, Pod's for Pod's.

Rendered by Ansible from roles/xapi's defaults and vars (xapi_testsupport.playbooks.render),
and probe.yml read for what its reading task runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from xapi_testsupport import playbooks

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "roles/xapi/tasks/probe.yml"


def reader(tmp_path: Path, enc_vars: str) -> list[str]:
    (tmp_path / "hosts.yml").write_text(
        "all:\n  vars:\n    ansible_connection: local\n  children:\n"
        "    pod_frontal:\n      hosts:\n        front1:\n"
        f"    pod_encodage:\n      hosts:\n        enc1:\n{enc_vars}"
    )
    (tmp_path / "reader.j2").write_text(
        "{{ xapi_probe_reader_user }} {{ xapi_probe_reader_python }}\n"
    )
    files = [ROOT / "roles/xapi/defaults/main.yml", ROOT / "roles/xapi/vars/main.yml"]
    result = playbooks.render(
        tmp_path, {str(tmp_path / "reader.j2"): "reader"}, files, {}, str(tmp_path / "hosts.yml")
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return (tmp_path / "front1-reader").read_text().split()


@pytest.mark.parametrize(
    ("enc_vars", "expected"),
    [
        ("", ["xapi-worker", "/opt/xapi-worker/bin/python"]),
        (
            "          xapi_encodage_worker_venv: /srv/xw\n"
            "          xapi_encodage_worker_user: xw\n",
            ["xw", "/srv/xw/bin/python"],
        ),
        (
            "          xapi_encodage_worker_app: pod\n",
            ["pod", "/home/pod/.virtualenvs/django_pod4/bin/python"],
        ),
    ],
    ids=["bundled-worker", "bundled-worker-elsewhere", "pods-task-module"],
)
def test_the_readers_interpreter_goes_with_its_user(
    tmp_path: Path, enc_vars: str, expected: list[str]
) -> None:
    assert reader(tmp_path, enc_vars) == expected


def test_the_reading_task_runs_that_interpreter_as_that_user() -> None:
    """No other interpreter is tried: a missing venv fails the probe rather than running
    Pod's venv as the worker's user."""
    tasks = yaml.safe_load(PROBE.read_text())
    reading = next(t for t in tasks if t["name"].startswith("Wait for the statement"))
    assert reading["ansible.builtin.command"]["argv"][0] == "{{ xapi_probe_reader_python }}"
    assert reading["become_user"] == "{{ xapi_probe_reader_user }}"
    assert "pod_venv" not in PROBE.read_text().split("Read the frontal's answer")[1]
