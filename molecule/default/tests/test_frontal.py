"""Issue 6, roles/xapi_frontal: xAPI turned on in an existing Pod frontal without breaking it.

Real checks on the converged frontal: the managed block of Pod's settings_local.py and the
operator's own lines (written by lab/prepare.yml before the first converge), the broker
client of Pod's venv (kombu fixed, Pod's other pins untouched), the web service restarted
after the change, and one statement queued with `.delay()` exactly as Pod's view does, read
back from the LRS by id.
"""

from __future__ import annotations

import base64
import json
import re
import textwrap
from pathlib import Path

import pytest
from xapi_testsupport.pod_on_host import POD_DIR, VENV, as_pod, as_pod_command, lrs_auth
from xapi_testsupport.statements import EXT, agent, video_context
from xapi_testsupport.statements import statement as build_statement

SETTINGS = f"{POD_DIR}/pod/custom/settings_local.py"
# The pin set whose kombu== line is the kombu fix (on the controller: the frontal gets no copy).
CONSTRAINTS = Path(__file__).resolve().parents[3] / "xapi_worker/constraints.txt"
MARK = "xAPI settings managed by Ansible (Esup-Pod xAPI bundle)"
BEGIN, END = f"# BEGIN {MARK}", f"# END {MARK}"
MANAGED_NAMES = [
    "USE_XAPI",
    "USE_XAPI_VIDEO",
    "XAPI_ANONYMIZE_ACTOR",
    "XAPI_AUTHENTICATED_NAME",
    "XAPI_LRS_URL",
    "XAPI_CELERY_BROKER_URL",
]
# Written by lab/prepare.yml before the first converge: the operator's own settings.
OPERATOR_LINES = [
    'SECRET_KEY = "lab-secret-key-not-for-production"',
    "DEBUG = False",
    'TITLE_SITE = "Pod (lab)"',
    'ALLOWED_HOSTS = ["*"]',
]
# How long the statement may take from .delay() to the LRS (broker + encoding worker).
DELIVERY_WAIT = 60


def pod_python(host, code: str, timeout: int = 120):
    """Run code with Pod's venv python, as user pod, from Pod's directory (as Pod's views).
    The code goes on stdin, not argv: some of it holds the LRS credentials."""
    payload = base64.b64encode(textwrap.dedent(code).encode()).decode()
    return host.run(
        f"echo {payload} | base64 -d | timeout {timeout} "
        + as_pod_command(f"cd {POD_DIR} && exec {VENV}/bin/python -")
    )


def pod_json(host, code: str, timeout: int = 120) -> dict:
    result = pod_python(host, code, timeout)
    assert result.rc == 0, f"rc={result.rc}\n{result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def settings_text(frontal) -> str:
    return frontal.file(SETTINGS).content_string


def split_block(text: str) -> tuple[list[str], list[str]]:
    """(lines of the managed block, the operator's lines outside it)."""
    lines = text.splitlines()
    assert lines.count(BEGIN) == 1 and lines.count(END) == 1, "exactly one managed block"
    start, end = lines.index(BEGIN), lines.index(END)
    assert start < end
    return lines[start + 1 : end], lines[:start] + lines[end + 1 :]


# After the settings, the block names Pod's Celery settings module (the publish bounds).
ENVIRONMENT_LINES = [
    "# Environment of the process that reads these settings (an operator's value wins).",
    "import os as _xapi_os  # noqa: E402",
    '_xapi_os.environ.setdefault("CELERY_CONFIG_MODULE", "pod.custom.xapi_celery")',
]


def test_settings_block_holds_exactly_the_xapi_settings(frontal):
    block, _ = split_block(settings_text(frontal))
    settings, environment = block[: len(MANAGED_NAMES)], block[len(MANAGED_NAMES) :]
    assert [line.split("=", 1)[0].strip() for line in settings] == MANAGED_NAMES
    assert environment == ENVIRONMENT_LINES


def test_settings_values_as_pod_reads_them(frontal):
    # Imported the way pod.xapi.xapi_tasks does; secrets are reported as lengths only.
    values = pod_json(
        frontal,
        """
        import json
        from urllib.parse import urlsplit
        from pod.custom import settings_local as s
        broker = urlsplit(s.XAPI_CELERY_BROKER_URL)
        print(json.dumps({
            "use_xapi": s.USE_XAPI, "use_xapi_video": s.USE_XAPI_VIDEO,
            "anonymize": s.XAPI_ANONYMIZE_ACTOR, "name": s.XAPI_AUTHENTICATED_NAME,
            "lrs_url": s.XAPI_LRS_URL,
            "lrs_credentials": [hasattr(s, "XAPI_LRS_LOGIN"), hasattr(s, "XAPI_LRS_PWD")],
            "broker": [broker.scheme, broker.username, broker.hostname, broker.port,
                       broker.path, len(broker.password or "")],
        }))
        """,
    )
    assert values["use_xapi"] is True
    assert values["use_xapi_video"] is True
    assert values["anonymize"] is True
    assert values["name"] == "username"
    assert re.match(r"^https?://[^/]+/.*xAPI/statements/?$", values["lrs_url"])
    # The web server never calls the LRS: it holds no LRS credential (security review, 6).
    assert values["lrs_credentials"] == [False, False]
    scheme, user, host, port, path, password_len = values["broker"]
    # The frontal's own xAPI instance (port 6380), over loopback: Pod's Redis keeps 6379.
    # With the producer's own user (xapi_broker_producer_user), not the workers'.
    assert (scheme, user, host, port, path) == ("redis", "xapi-producer", "127.0.0.1", 6380, "/6")
    assert password_len >= 12


def test_settings_file_mode_and_owner(frontal):
    """root:pod 0640: Pod (group pod) reads its settings, the web app cannot rewrite them."""
    settings = frontal.file(SETTINGS)
    assert (settings.user, settings.group, settings.mode) == ("root", "pod", 0o640)
    assert as_pod(frontal, f"echo >> {SETTINGS}").rc != 0
    assert as_pod(frontal, f"cat {SETTINGS}").rc == 0


def test_settings_file_compiles(frontal):
    assert frontal.run(f"/usr/bin/python3 -m py_compile {SETTINGS}").rc == 0


def test_operator_lines_survive(frontal):
    _, outside = split_block(settings_text(frontal))
    for line in OPERATOR_LINES:
        assert outside.count(line) == 1, f"operator line lost or duplicated: {line}"


def test_pod_pins_unchanged_and_kombu_fixed(frontal):
    pins = dict(
        line.split("==", 1)
        for line in frontal.file(f"{POD_DIR}/requirements-encode.txt").content_string.split()
        if "==" in line
    )
    installed = {
        p["name"].lower(): p["version"]
        for p in json.loads(
            frontal.check_output(
                as_pod_command(f"{VENV}/bin/pip list --format=json --disable-pip-version-check")
            )
        )
    }
    for name in ("celery", "redis", "requests"):
        assert installed[name] == pins[name], f"{name} was changed in Pod's venv"
    kombu_pin = re.search(r"(?im)^kombu==(\S+)", CONSTRAINTS.read_text())
    assert kombu_pin and installed["kombu"] == kombu_pin.group(1)
    # kombu's own redis extra accepts the installed redis-py (what kombu 5.7 broke).
    check = pod_json(
        frontal,
        """
        import json
        from importlib import metadata
        from packaging.requirements import Requirement
        redis = metadata.version("redis")
        bad = [r for r in map(Requirement, metadata.requires("kombu") or [])
               if r.name == "redis" and r.marker and r.marker.evaluate({"extra": "redis"})
               and not r.specifier.contains(redis, prereleases=True)]
        print(json.dumps({"bad": [str(r) for r in bad]}))
        """,
    )
    assert check["bad"] == []


def test_web_service_restarted_after_the_settings_changed(frontal):
    service = frontal.service("uwsgi-pod")
    assert service.is_running
    started = frontal.check_output(
        "systemctl show -p ActiveEnterTimestamp --timestamp=unix uwsgi-pod"
    )
    started_at = int(started.split("@", 1)[1])
    assert started_at >= int(frontal.file(SETTINGS).mtime.timestamp())


@pytest.fixture(scope="module")
def queued_statement(frontal) -> dict:
    """Queue one statement with Pod's own task, as pod/xapi/views.py does."""
    statement = build_statement(
        "played",
        actor=agent("test-frontal", "mailto:t@example.org"),
        object_id="https://pod.example.org/video/0001-test-frontal/",
        context=video_context(),
        result={"extensions": {EXT + "time": 1.0}},
    )
    statement_id = statement["id"]
    result = pod_python(
        frontal,
        f"""
        import json
        from pod.xapi.xapi_tasks import send_xapi_statement_task
        result = send_xapi_statement_task.delay(json.loads({json.dumps(json.dumps(statement))}))
        print(json.dumps({{"task": result.id}}))
        """,
        timeout=90,
    )
    return {"id": statement_id, "rc": result.rc, "stdout": result.stdout, "stderr": result.stderr}


def test_delay_queues_the_statement(queued_statement):
    assert queued_statement["rc"] == 0, (
        "send_xapi_statement_task.delay() failed in Pod's venv (broker down, credentials "
        f"refused or broken kombu):\n{queued_statement['stderr'][-2000:]}"
    )
    assert json.loads(queued_statement["stdout"].strip().splitlines()[-1])["task"]


def test_statement_is_read_back_from_the_lrs(frontal, queued_statement):
    if queued_statement["rc"] != 0:
        pytest.fail("nothing was queued (see test_delay_queues_the_statement)")
    auth = lrs_auth()  # the inventory's: the frontal has none
    found = pod_json(
        frontal,
        f"""
        import json, time
        import requests
        from pod.custom import settings_local as s
        wanted = "{queued_statement["id"]}"
        deadline, status, stored = time.monotonic() + {DELIVERY_WAIT}, None, None
        while stored is None and time.monotonic() < deadline:
            answer = requests.get(
                s.XAPI_LRS_URL, params={{"statementId": wanted}},
                headers={{"X-Experience-API-Version": "1.0.3"}},
                auth=({auth["login"]!r}, {auth["password"]!r}), timeout=10)
            status = answer.status_code
            if status == 200:
                # xAPI answers the statement itself; Ralph a StatementResult (empty if absent).
                body = answer.json()
                found = [body] if "id" in body else body.get("statements", [])
                stored = next((x for x in found if x.get("id") == wanted), None)
            if stored is None:
                time.sleep(2)
        print(json.dumps({{"status": status, "stored": stored}}))
        """,
        timeout=DELIVERY_WAIT + 60,
    )
    assert found["stored"], (
        f"statement not in the LRS after {DELIVERY_WAIT}s (last status {found['status']}): "
        "is the encoding worker running?"
    )
    assert found["stored"]["id"] == queued_statement["id"]
    assert found["stored"]["verb"]["id"] == "https://w3id.org/xapi/video/verbs/played"


# The role's check of the public host name, run on the frontal as the role runs it: Pod's venv
# python as pod, the validator Ralph's models use (email_validator, from Pod's requirements).
PUBLIC_HOST_CHECK = Path(__file__).resolve().parents[3] / (
    "roles/xapi_frontal/files/xapi_frontal_public_host_check.py"
)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("host:8000", False), ("frontal", False), ("pod.test", False), ("pod.lab.example.org", True)],
)
def test_public_host_checked_with_pods_own_validator(frontal, name, ok):
    code = base64.b64encode(PUBLIC_HOST_CHECK.read_bytes()).decode()
    stdin = base64.b64encode(json.dumps({"host": name}).encode()).decode()
    result = frontal.run(
        f"echo {stdin} | base64 -d | runuser -u pod -- {VENV}/bin/python -c "
        f'"$(echo {code} | base64 -d)"'
    )
    assert result.rc == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["checked"] is True and answer["validator"].startswith("email-validator ")
    assert answer["ok"] is ok, answer
