"""roles/xapi_encodage's handlers: a change of Pod's checkout or venv (roles/xapi_encodage_pod
notifies `xapi_encodage_pod changed`) restarts the workers only when they run Pod's task
module from them; the bundled worker, in a venv of its own, was restarted needlessly
(session 5's review, L3).

The role's handlers file, run for real on this machine in --check (the restart itself then
does nothing; only which handlers run is looked at), after a task notifying the topic.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles/xapi_encodage"
RESTART = "RUNNING HANDLER [Restart celeryd-xapi (sysv)]"
POD_RESTART = "RUNNING HANDLER [Restart Pod's worker after a change of Pod's code or venv]"


def notify_pod_changed(tmp_path: Path, app: str) -> str:
    playbook = tmp_path / "handlers.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": {
                        "xapi_encodage_worker_app": app,
                        "xapi_encodage_service_manager": "sysv",
                    },
                    "tasks": [
                        {
                            "name": "Pod's checkout changed",
                            "ansible.builtin.debug": {"msg": "changed"},
                            "changed_when": True,
                            "notify": "xapi_encodage_pod changed",
                        }
                    ],
                    "handlers": [{"ansible.builtin.import_tasks": str(ROLE / "handlers/main.yml")}],
                }
            ]
        )
    )
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    run = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", "--check", str(playbook)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    return run.stdout + run.stderr


def ran(output: str, handler: str) -> bool:
    """The handler ran (its header is printed, followed by `skipping` when its `when` is
    false; in --check the restart of a service this machine lacks may fail: it ran)."""
    if handler not in output:
        return False
    after = output.split(handler, 1)[1].split("\n", 2)[1]
    return not after.startswith("skipping")


@pytest.mark.parametrize(("app", "restarted"), [("xapi_worker", False), ("pod", True)])
def test_pods_changes_restart_only_pods_task_module(
    tmp_path: Path, app: str, restarted: bool
) -> None:
    output = notify_pod_changed(tmp_path, app)
    assert "Pod's checkout changed" in output, output[-3000:]
    assert ran(output, RESTART) == restarted, output[-3000:]
    assert ran(output, POD_RESTART) == restarted, output[-3000:]
