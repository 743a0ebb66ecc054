"""The move from the worker run as pod (the layout of earlier releases) to the worker's own
user, with statements in flight, nothing lost (security review round two, finding 2).

The encoding host is taken back to the earlier layout by that release's own role (the
repository at OLD_LAYOUT, `playbooks/xapi_encodage.yml`): the worker as pod from Pod's tree,
its spool pod's, the LRS and broker passwords in settings_local.py's xAPI block. With the LRS
stopped, statements are produced; the worker takes them (spool, unacked, in-flight), and is
killed. Then this release's role runs: the spool is the worker's user's, the old secrets are
gone from Pod's file, every statement reaches the LRS once it is back, and a second run
changes nothing. Last in the scenario: it leaves the worker with quicker retries (QUICK).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from test_worker_user import import_path
from xapi_testsupport.pod_on_host import POD_DIR, as_pod, delivered, produce
from xapi_testsupport.polling import wait_until
from xapi_testsupport.worker_on_host import WORKER, as_worker

ROOT = Path(__file__).resolve().parents[3]
#: The last commit of the earlier layout (the worker run as pod).
OLD_LAYOUT = "7ebffb736e517006d74cbdd7088d1d46b93618b1"
SETTINGS = f"{POD_DIR}/pod/custom/settings_local.py"
SPOOL = "/var/lib/celeryd-xapi/spool"
NODE_UNIT = "celeryd-xapi@xapi.service"
VENV = "/opt/xapi-worker"
WORKER_ENV = "/etc/celeryd-xapi/worker.env"
# Quick retries, so that the statements reach the spool within seconds of the LRS going down,
# and a short visibility timeout, so that what the killed worker held in `unacked` comes back
# within a minute rather than ten (both runs get them: the settings are not what is tested).
QUICK = json.dumps(
    {
        "xapi_encodage_worker_settings": {
            "XAPI_WORKER_RETRY_BASE_SECONDS": 1,
            "XAPI_WORKER_RETRY_MAX_SECONDS": 5,
            "XAPI_WORKER_VISIBILITY_TIMEOUT": 60,
        }
    }
)


def inventory() -> str:
    if "MOLECULE_INVENTORY_FILE" in os.environ:
        return str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
    return str(Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory")


def run_role(tree: Path) -> subprocess.CompletedProcess[str]:
    """playbooks/xapi_encodage.yml of `tree`, with its own configuration and roles."""
    facts = tempfile.mkdtemp(prefix="xapi-facts-")
    # Plain output to parse: molecule's verifier environment forces colours.
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(tree / "ansible.cfg"),
        ANSIBLE_CACHE_PLUGIN_CONNECTION=facts,
        ANSIBLE_NOCOLOR="1",
    )
    env.pop("ANSIBLE_ROLES_PATH", None)
    env.pop("ANSIBLE_FORCE_COLOR", None)
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            inventory(),
            str(tree / "playbooks/xapi_encodage.yml"),
            "-e",
            QUICK,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    known = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD_LAYOUT}^{{commit}}"], check=False
    )
    if known.returncode != 0:
        pytest.skip(f"the repository's history lacks {OLD_LAYOUT} (a shallow clone)")
    tree = tmp_path_factory.mktemp("old-layout")
    archive = tree / "old.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), OLD_LAYOUT], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def worker_user(host) -> str:
    pid = host.check_output(f"systemctl show -p MainPID --value {NODE_UNIT}").strip()
    return host.check_output(f"ps -o user= -p {pid}").strip() if pid != "0" else ""


def changed_on(result: subprocess.CompletedProcess[str], host: str) -> int:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    recap = re.search(rf"^{re.escape(host)}\s*:.*?changed=(\d+)", plain, re.M)
    assert recap, result.stdout[-3000:]
    return int(recap.group(1))


def test_a_host_of_the_earlier_layout_moves_with_nothing_lost(old_tree, frontal, encodage, lrs):
    old = run_role(old_tree)
    assert old.returncode == 0, old.stdout[-3000:]
    # The earlier layout: the spool's files were pod's (the old worker made them as pod).
    encodage.check_output(f"chown pod:pod {SPOOL}/* && systemctl restart celeryd-xapi")
    assert wait_until(lambda: worker_user(encodage) == "pod", 30)
    assert "XAPI_LRS_PWD" in encodage.file(SETTINGS).content_string
    # On this layout the foothold of test_worker_user.py succeeds (those tests fail on it):
    # pod lists the spool, reads the worker's settings, and writes in the worker's working
    # directory, the first of its import path.
    assert as_pod(encodage, f"ls {SPOOL}").rc == 0
    assert as_pod(encodage, f"cat {WORKER_ENV} > /dev/null").rc == 0
    assert import_path(encodage)[1] == POD_DIR
    assert as_pod(encodage, f"test -w {POD_DIR}").rc == 0

    lrs.check_output("systemctl stop ralph-lrs")
    try:
        ids = [produce(frontal) for _ in range(30)]
        # Taken by the old worker (in its spool, unacked or in flight), then killed.
        encodage.run(f"sleep 8; systemctl kill -s SIGKILL {NODE_UNIT}")
        new = run_role(ROOT)
        assert new.returncode == 0, new.stdout[-3000:]
        # What the old worker had spooled, now read by the worker's user.
        spooled = as_worker(
            encodage,
            f"env XAPI_WORKER_CONFIG={WORKER_ENV} {VENV}/bin/xapi-worker spool list",
            cwd=VENV,
        )
        assert spooled.rc == 0, spooled.stdout + spooled.stderr
        print(f"spooled before the LRS came back: {len(spooled.stdout.splitlines())}")
    finally:
        lrs.check_output("systemctl start ralph-lrs")

    spool = encodage.check_output(f"find {SPOOL} -maxdepth 1 -printf '%u %p\\n'").splitlines()
    assert spool and all(line.split()[0] == WORKER for line in spool), spool
    assert wait_until(lambda: worker_user(encodage) == WORKER, 30)
    text = encodage.file(SETTINGS).content_string
    assert "XAPI_LRS_PWD" not in text and "xAPI settings managed" not in text
    missing = [i for i in ids if not delivered(frontal, i, timeout=180)]
    assert missing == []

    again = run_role(ROOT)
    assert again.returncode == 0 and changed_on(again, "encodage") == 0, again.stdout[-3000:]
