"""Passwords of every printable character (group_vars/all/zz_hostile_passwords.yml), end to
end: the ACL file, settings_local.py on the frontal and on the encoding host of Pod's task
module, the bundled worker's settings file, Pod's producer and both workers (the delivery
tests of test_sysv.py run with these passwords). Security review, point 2."""

from __future__ import annotations

import hashlib
import json
import shlex
import string
from urllib.parse import unquote, urlsplit

import pytest
from xapi_testsupport.pod_on_host import as_pod_python, inventory_vars
from xapi_testsupport.worker_on_host import as_worker_command

PRINTABLE = set(string.printable) - set(string.whitespace) | {" "}
ACL_FILE = "/etc/redis/redis-xapi.acl"

# settings_local.py as Pod's code imports it: the values it needs, as JSON.
POD_SETTINGS = """
import json
from pod.custom import settings_local as s
print(json.dumps({name: getattr(s, name, None) for name in
                  ("XAPI_LRS_PWD", "XAPI_CELERY_BROKER_URL")}))
"""
# The bundled worker's own parser on its settings file.
WORKER_SETTINGS = """
import json
from xapi_worker.settings import load_settings
s = load_settings()
print(json.dumps({"XAPI_LRS_PWD": s.lrs_password, "XAPI_CELERY_BROKER_URL": s.broker_url}))
"""


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    values = inventory_vars()
    return {
        name: values[name]
        for name in (
            "xapi_broker_password",
            "xapi_broker_producer_password",
            "xapi_lrs_password",
            "xapi_broker_admin_password",
        )
    }


def broker_password(url: str) -> str:
    return unquote(urlsplit(url).password or "")


def pod_settings(host) -> dict:
    result = as_pod_python(host, POD_SETTINGS)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_passwords_hold_every_printable_character(passwords):
    for name, value in passwords.items():
        assert PRINTABLE <= set(value), f"{name} lacks {sorted(PRINTABLE - set(value))}"


def test_acl_file_holds_their_hashes(frontal, passwords):
    acl = frontal.file(ACL_FILE).content_string
    for name in (
        "xapi_broker_password",
        "xapi_broker_producer_password",
        "xapi_broker_admin_password",
    ):
        assert "#" + hashlib.sha256(passwords[name].encode()).hexdigest() in acl, name
        assert passwords[name] not in acl


def test_pod_reads_them_back_on_the_frontal(frontal, passwords):
    # The frontal's producer has its own user (roles/xapi_broker README, "The producer's ACL").
    values = pod_settings(frontal)
    assert (
        broker_password(values["XAPI_CELERY_BROKER_URL"])
        == passwords["xapi_broker_producer_password"]
    )


def test_pod_task_module_reads_them_back(enc2, passwords):
    values = pod_settings(enc2)
    assert values["XAPI_LRS_PWD"] == passwords["xapi_lrs_password"]
    assert broker_password(values["XAPI_CELERY_BROKER_URL"]) == passwords["xapi_broker_password"]


def test_bundled_worker_reads_them_back(enc1, passwords):
    out = enc1.check_output(
        as_worker_command(
            "env XAPI_WORKER_CONFIG=/etc/celeryd-xapi/worker.env "
            f"/opt/xapi-worker/bin/python -c {shlex.quote(WORKER_SETTINGS)}"
        )
    )
    values = json.loads(out.splitlines()[-1])
    assert values["XAPI_LRS_PWD"] == passwords["xapi_lrs_password"]
    assert broker_password(values["XAPI_CELERY_BROKER_URL"]) == passwords["xapi_broker_password"]
