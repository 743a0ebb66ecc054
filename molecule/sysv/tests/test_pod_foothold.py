"""A foothold as pod (the user that runs Pod's encoder on uploaded videos) gives nothing more:
root never executes, follows or trusts what pod can write (security review, point 1).

pod plants a `.pth` file in its venv (any interpreter of that venv runs it at start), an init
script where earlier layouts unpacked Celery's sdist, and links in place of settings_local.py;
site.yml runs again. Nothing runs as root, no ownership moves, no root file leaks.
"""

from __future__ import annotations

import base64
import uuid

import pytest
from xapi_testsupport.playbooks import molecule_inventory, runner
from xapi_testsupport.pod_on_host import POD_DIR, VENV, as_pod

SITE_PACKAGES = f"{VENV}/lib/python3.11/site-packages"
MARKS = "/home/pod/foothold.log"
# What a root process on the host would pass through: the init script unpacked by earlier
# layouts (pod-owned then), and the root-owned one of now.
OLD_SCRIPT = "/usr/local/lib/xapi-worker/sdist/celery-5.4.0/extra/generic-init.d/celeryd"
NEW_SCRIPT = "/usr/local/lib/xapi-worker/init-script/celery-5.4.0/extra/generic-init.d/celeryd"
ROOT_PATHS = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/etc/init.d/celeryd-xapi",
    "/etc/default/celeryd-xapi",
    "/etc/celeryd-xapi",
    "/usr/local/lib/xapi-worker",
    "/opt/xapi-worker",
]
SETTINGS = f"{POD_DIR}/pod/custom/settings_local.py"


def ownership(host) -> str:
    """Owner, group and mode of the root paths, and every file pod owns outside its trees."""
    listing = host.run(f"stat -c '%U:%G:%a %n' {' '.join(ROOT_PATHS)} 2>/dev/null").stdout
    owned = host.run(
        "find /etc /usr /opt /var/lib /srv -xdev -user pod "
        f"-not -path '{POD_DIR}/*' -not -path '/srv/git/*' 2>/dev/null | sort"
    ).stdout
    return listing + owned


@pytest.fixture(scope="module")
def run():
    return runner(molecule_inventory(), timeout=900)


def test_pth_and_planted_init_script_never_run_as_root(enc2, run):
    before = ownership(enc2)
    mark = "import os; open('/home/pod/foothold.log', 'a').write('pth %d\\n' % os.geteuid())\n"
    planted = base64.b64encode(mark.encode()).decode()
    assert as_pod(enc2, f"echo {planted} | base64 -d > {SITE_PACKAGES}/zz_foothold.pth").rc == 0
    for script in (OLD_SCRIPT, NEW_SCRIPT):
        # Refused for the root-owned one (and absent now for the old one): pod tries anyway.
        as_pod(enc2, f"sed -i '2i echo init $(id -u) >> {MARKS}' {script}")
    try:
        result = run("xapi_encodage.yml", "--limit", "sysv-enc2")
        assert result.returncode == 0, result.stdout[-3000:]
        # Whatever the run changed or not, root starts the workers through the init script.
        assert enc2.run("service celeryd-xapi restart").rc == 0
        marks = enc2.run(f"cat {MARKS}").stdout.split("\n")
        assert [m for m in marks if m.endswith(" 0")] == [], marks
        assert any(m.startswith("pth ") for m in marks), "the .pth file never ran: no proof"
        assert enc2.run(f"test -e {OLD_SCRIPT}").rc != 0
        assert enc2.file(NEW_SCRIPT).user == "root"
        assert as_pod(enc2, f"test -w {NEW_SCRIPT}").rc != 0
        assert ownership(enc2) == before
    finally:
        enc2.run(f"rm -f {SITE_PACKAGES}/zz_foothold.pth {MARKS}")


@pytest.mark.parametrize(
    "host_name, playbook",
    [("sysv-enc2", "xapi_encodage.yml"), ("sysv-frontal", "xapi_frontal.yml")],
)
def test_settings_link_refused(request, run, host_name, playbook):
    host = request.getfixturevalue({"sysv-enc2": "enc2", "sysv-frontal": "frontal"}[host_name])
    canary = f"CANARY-{uuid.uuid4().hex}"
    host.check_output(f"umask 077 && echo {canary} > /etc/xapi-foothold-canary")
    before = ownership(host)
    assert as_pod(host, f"mv {SETTINGS} {SETTINGS}.keep").rc == 0
    try:
        assert as_pod(host, f"ln -s /etc/xapi-foothold-canary {SETTINGS}").rc == 0
        result = run(playbook, "--limit", host_name)
        assert result.returncode != 0, "the run wrote through the link"
        assert "is not a plain file on a plain path" in result.stdout, result.stdout[-3000:]
        canary_file = host.file("/etc/xapi-foothold-canary")
        assert (canary_file.user, canary_file.mode) == ("root", 0o600)
        assert canary_file.content_string.strip() == canary
        leaked = host.run(f"grep -rl {canary} {POD_DIR} /home/pod /tmp /var/tmp").stdout
        assert leaked == "", f"the canary reached {leaked}"
        assert ownership(host) == before
    finally:
        host.run(
            f"rm -f {SETTINGS} && mv {SETTINGS}.keep {SETTINGS}; rm -f /etc/xapi-foothold-canary"
        )
    assert host.file(SETTINGS).is_file and not host.file(SETTINGS).is_symlink
