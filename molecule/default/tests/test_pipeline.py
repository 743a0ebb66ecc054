"""The operators' playbooks, run as operators run them on this scenario's hosts."""

from __future__ import annotations

import json
import time

from xapi_testsupport.pod_on_host import as_pod_python
from xapi_testsupport.statements import statement as build_statement


def test_check_playbook_delivers_a_statement(playbook) -> None:
    result = playbook("check.yml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "delivered end to end" in result.stdout


def test_status_playbook_reports_a_healthy_pipeline(playbook) -> None:
    result = playbook("status.yml")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "broker and LRS       OK" in result.stdout
    assert "workers answering    1 of 1" in result.stdout


def queue_invalid_statement(frontal, actor: dict | None = None) -> str:
    """A statement the LRS must refuse (no verb), queued with Pod's own producer."""
    statement = build_statement(
        None,
        actor=actor or {"mbox": "mailto:dead-letter@example.org"},
        object_id="https://pod.example.org/video/0002/",
        object_type=None,
    )
    code = (
        "import json,sys; from pod.xapi.xapi_tasks import send_xapi_statement_task as t; "
        "t.delay(json.loads(sys.argv[1]))"
    )
    cmd = as_pod_python(frontal, code, json.dumps(statement))
    assert cmd.rc == 0, cmd.stderr
    return statement["id"]


def test_dead_letters_playbook_lists_and_purges(playbook, frontal) -> None:
    statement_id = queue_invalid_statement(frontal)
    deadline = time.monotonic() + 60
    listed = playbook("dead-letters.yml")
    while statement_id not in listed.stdout and time.monotonic() < deadline:
        time.sleep(2)
        listed = playbook("dead-letters.yml")
    assert statement_id in listed.stdout, listed.stdout[-3000:]
    purged = playbook("dead-letters.yml", "-e", "action=purge")
    assert purged.returncode == 0, purged.stdout[-3000:]
    assert statement_id not in playbook("dead-letters.yml").stdout


def test_forget_playbook_removes_a_learner_and_never_shows_who(playbook, frontal) -> None:
    """playbooks/forget.yml on every worker host: the learner's dead letter is gone, the
    output says how many were removed where, and the learner appears nowhere in it."""
    learner = "mailto:forget-me@example.org"
    statement_id = queue_invalid_statement(frontal, actor={"mbox": learner})
    deadline = time.monotonic() + 60
    listed = playbook("dead-letters.yml")
    while statement_id not in listed.stdout and time.monotonic() < deadline:
        time.sleep(2)
        listed = playbook("dead-letters.yml")
    assert statement_id in listed.stdout, listed.stdout[-3000:]
    refused = playbook("forget.yml", "-e", "mbox=not-an-address")
    assert refused.returncode != 0 and "not-an-address" not in refused.stdout + refused.stderr
    forgot = playbook("forget.yml", "-e", f"mbox={learner.upper()}")
    output = forgot.stdout + forgot.stderr
    assert forgot.returncode == 0, output[-3000:]
    flat = " ".join(output.replace('\\"', '"').split())  # the callback wraps long lines
    assert '"dead_letters": 1' in flat, output[-3000:]
    assert "forget-me" not in output.lower()
    assert statement_id not in playbook("dead-letters.yml").stdout
