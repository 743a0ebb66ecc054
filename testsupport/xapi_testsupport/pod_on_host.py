"""Running things on a lab host as user pod, and the helpers built on it: Pod's own producer
and an LRS read-back, with Pod's venv and settings_local.py. Used by the scenarios' tests and
by the benchmark, whose hosts are not testinfra's but answer run() the same way."""

from __future__ import annotations

import base64
import functools
import json
import os
import shlex
import subprocess
from typing import Any, Protocol

from xapi_testsupport.playbooks import ROOT, molecule_inventory
from xapi_testsupport.polling import wait_until
from xapi_testsupport.statements import agent, now, statement

POD_DIR = "/usr/local/django_projects/podv4"
VENV = "/home/pod/.virtualenvs/django_pod4"
# Pod's venv python as user pod, with Pod's tree importable whatever the script's directory.
POD_PYTHON = f"runuser -u pod -- env PYTHONPATH={POD_DIR} {VENV}/bin/python"


class Result(Protocol):
    """What a command's result holds (testinfra's CommandResult, the bench's alike)."""

    rc: int
    stdout: str
    stderr: str


class Host(Protocol):
    """What running as pod needs of a host: testinfra's run()."""

    def run(self, command: str) -> Result: ...


class File(Protocol):
    content_string: str


class TestinfraHost(Host, Protocol):
    """A testinfra host: also its files and check_output()."""

    def file(self, path: str) -> File: ...

    def check_output(self, command: str, *args: str) -> str: ...


def as_pod_command(command: str, *, cwd: str | None = None) -> str:
    """The shell line that runs `command` (itself a shell line) as user pod; `cwd` is entered
    first, as root, as the tests always did."""
    line = f"runuser -u pod -- sh -c {shlex.quote(command)}"
    return f"cd {cwd} && {line}" if cwd else line


def as_pod(host: Host, command: str, *, cwd: str | None = None) -> Result:
    """`command` run as user pod on a testinfra host (its result: rc, stdout, stderr)."""
    return host.run(as_pod_command(command, cwd=cwd))


def as_pod_python(
    host: Host, code: str, *args: str, stdin: str = "", timeout: int | None = None
) -> Result:
    """Python `code` run by Pod's venv as user pod from Pod's directory (as Pod's views run),
    with `args` in sys.argv[1:] and `stdin` on its standard input; `timeout` (seconds) ends
    it if it takes longer."""
    quoted = " ".join(shlex.quote(a) for a in args)
    feed = base64.b64encode(stdin.encode()).decode()
    bound = f"timeout {timeout} " if timeout is not None else ""
    return host.run(
        f"cd {POD_DIR} && echo {feed} | base64 -d | {bound}{POD_PYTHON} "
        f"-c {shlex.quote(code)} {quoted}"
    )


# Pod's own producer (pod.xapi.xapi_tasks.send_xapi_statement_task.delay), as the frontal's
# views call it, run from the encoding venv with Pod's settings_local.py; the statement comes
# as JSON in argv[1].
PRODUCE = """
import json, sys
from pod.xapi.xapi_tasks import send_xapi_statement_task
send_xapi_statement_task.delay(json.loads(sys.argv[1]))
"""

# Reads one statement back from the LRS at the URL of settings_local.py. The credentials come
# from the scenario's inventory on stdin: the frontal holds none (roles/xapi_frontal).
READ_BACK = """
import json, sys, requests
from pod.custom import settings_local as s
auth = json.load(sys.stdin)
r = requests.get(s.XAPI_LRS_URL, params={"statementId": sys.argv[1]},
                 auth=(auth["login"], auth["password"]),
                 headers={"X-Experience-API-Version": "1.0.3"}, timeout=10)
print(r.status_code)
print(r.text)
"""


@functools.cache
def inventory_vars() -> dict[str, Any]:
    """The scenario's inventory variables as written (not templated): one host's view."""
    scenario = {"MOLECULE_INVENTORY_FILE", "MOLECULE_EPHEMERAL_DIRECTORY"} & set(os.environ)
    inventory = molecule_inventory() if scenario else str(ROOT / "inventories" / "lab")
    listing = json.loads(
        subprocess.run(
            ["ansible-inventory", "-i", inventory, "--list"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    hostvars = listing["_meta"]["hostvars"]
    # `!unsafe` values come wrapped ({"__ansible_unsafe": value}).
    return {
        name: value["__ansible_unsafe"]
        if isinstance(value, dict) and set(value) == {"__ansible_unsafe"}
        else value
        for name, value in hostvars[sorted(hostvars)[0]].items()
    }


def lrs_auth() -> dict[str, str]:
    values = inventory_vars()
    return {"login": values["xapi_lrs_login"], "password": values["xapi_lrs_password"]}


def produce(host: Host) -> str:
    """Queues one played statement with Pod's producer on `host`; returns its id."""
    body = statement(
        "played",
        actor=agent("molecule", "mailto:molecule@example.org"),
        object_id="https://pod.example.org/video/0001-test/",
        timestamp=now(),
    )
    result = as_pod_python(host, PRODUCE, json.dumps(body))
    assert result.rc == 0, result.stderr
    return body["id"]


def delivered(host: Host, statement_id: str, timeout: float = 45) -> bool:
    def read_back() -> bool:
        result = as_pod_python(host, READ_BACK, statement_id, stdin=json.dumps(lrs_auth()))
        return result.rc == 0 and result.stdout.startswith("200") and statement_id in result.stdout

    return wait_until(read_back, timeout)


# Of the statement ids in argv, prints those the LRS does not hold (one per line).
MISSING = """
import json, sys, requests
from pod.custom import settings_local as s
auth = json.load(sys.stdin)
with requests.Session() as http:
    for sid in sys.argv[1:]:
        r = http.get(s.XAPI_LRS_URL, params={"statementId": sid},
                     auth=(auth["login"], auth["password"]),
                     headers={"X-Experience-API-Version": "1.0.3"}, timeout=10)
        if r.status_code != 200 or sid not in r.text:
            print(sid)
"""


def missing_from_lrs(host: Host, ids: list[str]) -> list[str]:
    """The ids of `ids` the LRS does not hold, read back in one run on the host."""
    result = as_pod_python(host, MISSING, *ids, stdin=json.dumps(lrs_auth()))
    assert result.rc == 0, result.stderr
    return result.stdout.split()


# What the bundle must leave as it was (lab/files/pod_site_snapshot.py): lab/prepare.yml
# keeps the snapshot taken before the first site.yml; this takes one now.
SNAPSHOT = (
    "/usr/bin/python3 /usr/local/lib/xapi-lab/pod_site_snapshot.py "
    "/usr/local/lib/xapi-lab/pod_redis_state.py"
)
SNAPSHOT_BEFORE = "/var/lib/xapi-lab/site-before.json"


def site_snapshots(host: TestinfraHost) -> tuple[dict, dict]:
    """(before the bundle, now) of the host's Pod files, services and Redis data."""
    before = json.loads(host.file(SNAPSHOT_BEFORE).content_string)
    return before, json.loads(host.check_output(SNAPSHOT))
