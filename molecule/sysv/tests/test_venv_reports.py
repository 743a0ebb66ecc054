"""The kombu fix says every package it changes in Pod's venv (issue 32's review, gap 2).

pip's only-if-needed strategy moves what kombu 5.5.4's own requirements do not accept: on a
venv whose tzdata and vine are older than kombu 5.5.4 wants (tzdata>=2025.2, vine==5.1.0),
the fix moves them too. Both copies of the fix are run on such a venv (kombu 5.7.0, the
drift, with an older tzdata and vine): roles/xapi_frontal on the frontal, roles/xapi_encodage_pod
on sysv-enc2 (Pod's venv at 4.4.0 after test_upgrade_pod, no upgrade asked). The run's report
must name each package whose version differs between the venv's package lists before and
after, from -> to, and nothing else. Runs last (file order).
"""

from __future__ import annotations

import json
import re

import pytest
from test_sysv import run_role
from xapi_testsupport.pod_on_host import VENV, as_pod

# The lab reaches PyPI through the controller's trust store (lab/prepare.yml).
PIP = f"env PIP_CERT=/usr/local/share/lab-ca.pem PIP_DISABLE_PIP_VERSION_CHECK=1 {VENV}/bin/pip"
# kombu as a fresh install of Pod's pins resolves it, and two of its requirements older than
# kombu 5.5.4 accepts (installed without their dependents' say).
DRIFT = (f"{PIP} install -q kombu==5.7.0", f"{PIP} install -q --no-deps tzdata==2024.1 vine==5.0.0")


def packages(host) -> dict[str, str]:
    listed = as_pod(host, f"{PIP} list --format=json")
    assert listed.rc == 0, listed.stderr
    return {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}


@pytest.mark.parametrize(
    ("host_name", "playbook"),
    [("frontal", "xapi_frontal.yml"), ("enc2", "xapi_encodage.yml")],
)
def test_kombu_fix_reports_every_package_it_changes(request, host_name, playbook):
    host = request.getfixturevalue(host_name)
    for command in DRIFT:
        drift = as_pod(host, command)
        assert drift.rc == 0, drift.stderr
    before = packages(host)
    assert (before["kombu"], before["tzdata"], before["vine"]) == ("5.7.0", "2024.1", "5.0.0")

    fixed = run_role(f"sysv-{host_name}", playbook=playbook)
    assert fixed.returncode == 0, fixed.stdout[-3000:]
    after = packages(host)
    assert after["kombu"] == "5.5.4"
    changed = sorted(
        name for name in set(before) | set(after) if before.get(name) != after.get(name)
    )
    assert {"kombu", "tzdata", "vine"} <= set(changed), changed
    said = re.sub(r"\s+", " ", fixed.stdout.replace("''", "'"))
    report = re.search(
        r"kombu fix \(the Redis transport of kombu 5\.7 fails with Pod's redis 5\.2\.0\): "
        r"(.*?); nothing else changed there",
        said,
    )
    assert report, said[-3000:]
    expected = [f"{n} {before.get(n, 'none')} -> {after.get(n, 'none')}" for n in changed]
    assert report.group(1) == ", ".join(expected)
