"""Pod upgraded on purpose on an encoding host, 4.1.0 -> 4.4.0, under traffic (issue 32,
operator guide "Upgrading Pod on the encoding hosts"). sysv-enc2 is a Pod 4.1.0 host
(lab/prepare.yml, host_vars) running Pod's own task module from Pod's venv. An upgrade that
names a branch as its start is refused (issue 32's review, gap 3). Then, while the frontal
queues statements without a pause, the role runs with xapi_encodage_pod_upgrade_from and
_to, and pip fails (a kombu pin no index has): the checkout has moved (reported from -> to),
Pod's venv still has 4.1.0's pins. The same run again finishes the job (gap 1): Pod's venv
gets 4.4.0's requirements-encode.txt (requests 2.32.4 -> 2.34.2), nothing runs against the
database, and every statement sent meanwhile reaches the LRS. A pending record made stale
by hand is then ignored, said and dropped. Runs after test_sysv (file order): sysv-enc2
stays on 4.4.0.
"""

from __future__ import annotations

import json
import re
import threading
import time

from test_sysv import NODES, node_pids, run_role, wait_nodes_ready
from xapi_testsupport.pod_on_host import POD_DIR, VENV, as_pod, as_pod_python, missing_from_lrs
from xapi_testsupport.polling import wait_until
from xapi_testsupport.statements import agent, now, statement

REPO = "/srv/git/Esup-Pod.git"
RECORD = "/etc/ansible/facts.d/xapi_pod.fact"
STOP = "/var/tmp/xapi-upgrade-traffic.stop"
UPGRADE = ("-e", "xapi_encodage_pod_upgrade_from=4.1.0", "-e", "xapi_encodage_pod_upgrade_to=4.4.0")

# Pod's producer on the frontal, as its view calls it, until the stop file appears: the
# statement on stdin sent again and again under a new id, one every 0.2 s; prints the ids.
TRAFFIC = """
import json, os, sys, time, uuid
from pod.xapi.xapi_tasks import send_xapi_statement_task
body = json.load(sys.stdin)
while not os.path.exists(sys.argv[1]):
    body["id"] = str(uuid.uuid4())
    send_xapi_statement_task.delay(body)
    print(body["id"], flush=True)
    time.sleep(0.2)
"""


def versions(host) -> dict[str, str]:
    out = host.check_output(
        f'{VENV}/bin/python -c "import importlib.metadata as m, json; print(json.dumps('
        "{p: m.version(p) for p in ('celery', 'kombu', 'redis', 'requests', 'webvtt-py')}))\""
    )
    return json.loads(out)


def said(result) -> str:
    """A run's output on one line, YAML's doubled quotes undone."""
    return re.sub(r"\s+", " ", result.stdout.replace("''", "'"))


def test_upgrade_4_1_0_to_4_4_0_under_traffic(frontal, enc2, tmp_path):
    assert as_pod(enc2, f"git -C {POD_DIR} describe --tags --exact-match").stdout.strip() == "4.1.0"
    before_head = as_pod(enc2, f"git -C {POD_DIR} rev-parse HEAD").stdout.strip()
    assert versions(enc2)["requests"] == "2.32.4"

    # `from` names where the checkout is: a branch is refused, even one at the checkout's
    # commit (a site's own branch here; an earlier release took it and moved the checkout).
    assert as_pod(enc2, f"git -C {POD_DIR} branch lab-site HEAD").rc == 0
    try:
        branch = run_role(
            "sysv-enc2",
            "-e",
            "xapi_encodage_pod_upgrade_from=lab-site",
            "-e",
            "xapi_encodage_pod_upgrade_to=4.4.0",
        )
    finally:
        assert as_pod(enc2, f"git -C {POD_DIR} branch -D lab-site").rc == 0
    assert branch.returncode != 0
    refused = 'xapi_encodage_pod_upgrade_from ("lab-site") is a branch'
    assert refused in said(branch), said(branch)[-3000:]
    assert as_pod(enc2, f"git -C {POD_DIR} rev-parse HEAD").stdout.strip() == before_head

    # pip fails after the checkout moved: a kombu pin that no index has.
    no_such_kombu = tmp_path / "constraints.txt"
    no_such_kombu.write_text("kombu==0.0.0\n")
    interrupted_upgrade = (*UPGRADE, "-e", f"xapi_encodage_pod_constraints={no_such_kombu}")
    before_pids = node_pids(enc2)
    frontal.run(f"rm -f {STOP}")
    body = statement(
        "played",
        actor=agent("upgrade", "mailto:upgrade@example.org"),
        object_id="https://pod.example.org/video/0001-upgrade/",
        timestamp=now(),
    )
    sent: list = []
    traffic = threading.Thread(
        target=lambda: sent.append(
            as_pod_python(frontal, TRAFFIC, STOP, stdin=json.dumps(body), timeout=600)
        )
    )
    traffic.start()
    try:
        time.sleep(2)
        interrupted = run_role("sysv-enc2", *interrupted_upgrade)
        halfway = {
            "head": as_pod(enc2, f"git -C {POD_DIR} rev-parse HEAD").stdout.strip(),
            "requests": versions(enc2)["requests"],
            "record": json.loads(enc2.file(RECORD).content_string),
        }
        upgraded = run_role("sysv-enc2", *UPGRADE)
        # Statements still flow while the restarted workers come back.
        wait_nodes_ready(enc2)
        time.sleep(2)
    finally:
        frontal.run(f"touch {STOP}")
        traffic.join(timeout=60)
    tagged = enc2.check_output(f"git -C {REPO} rev-parse 4.4.0^{{commit}}")
    # The interrupted run: the checkout moved, pip failed, the old pins are left and the
    # record says 4.4.0's requirements are pending.
    assert interrupted.returncode != 0, interrupted.stdout[-3000:]
    moved = f"Pod upgraded on sysv-enc2: 4.1.0 ({before_head}) -> 4.4.0 ({tagged})"
    assert moved in said(interrupted), said(interrupted)[-3000:]
    assert halfway["head"] == tagged and halfway["requests"] == "2.32.4"
    assert halfway["record"]["pending_requirements"] == tagged, halfway["record"]
    # The run again: the checkout is already at 4.4.0, the venv gets its requirements.
    assert upgraded.returncode == 0, upgraded.stdout[-3000:]
    done = said(upgraded)
    assert "is already at 4.4.0" in done, done[-3000:]
    assert f"does not have the requirements of its checkout yet (4.4.0, {tagged})" in done
    assert "requests 2.32.4 -> 2.34.2" in done, done[-3000:]
    record = json.loads(enc2.file(RECORD).content_string)
    assert "pending_requirements" not in record and record["requirements"] == tagged, record

    # The checkout at 4.4.0, Pod's venv with 4.4.0's pins and the kombu fix, consistent.
    assert as_pod(enc2, f"git -C {POD_DIR} rev-parse HEAD").stdout.strip() == tagged
    assert versions(enc2) == {
        "celery": "5.4.0",
        "kombu": "5.5.4",
        "redis": "5.2.0",
        "requests": "2.34.2",
        "webvtt-py": "0.5.1",
    }
    assert as_pod(enc2, f"{VENV}/bin/pip check --disable-pip-version-check").rc == 0
    # No database or index command (the stand-in manage.py and Makefile record any call).
    assert enc2.file("/var/log/pod-invocations.log").content_string == ""
    # The xAPI workers were restarted onto the new code, and are back.
    assert set(node_pids(enc2)) == set(NODES) and node_pids(enc2) != before_pids

    # Every statement sent during the upgrade is in the LRS: 0 lost.
    assert sent and sent[0].rc == 0, sent[0].stderr if sent else "traffic never ended"
    ids = sent[0].stdout.split()
    assert len(ids) >= 50, f"only {len(ids)} statements sent during the upgrade"
    left: list[str] = []

    def all_delivered() -> bool:
        left[:] = missing_from_lrs(frontal, ids)
        return not left

    assert wait_until(all_delivered, 90), f"{len(left)} of {len(ids)} lost: {left[:5]}"

    # A second run with the same variables has nothing to move.
    again = run_role("sysv-enc2", *UPGRADE)
    assert again.returncode == 0, again.stdout[-3000:]
    assert re.search(r"sysv-enc2\s+:.*changed=0", again.stdout), again.stdout[-3000:]
    assert "is already at 4.4.0" in said(again)
    assert "does not have the requirements" not in said(again)

    # A pending record made stale by hand (pod5 review): requirements left pending for
    # 4.1.0's commit while the checkout is at 4.4.0 (as after an interrupted upgrade rolled
    # back, then forward, by hand). The run installs nothing, says the entry is ignored and
    # drops it, so that a checkout brought back to that commit later gets nothing unasked.
    planted = enc2.run(
        "python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); "
        'r["pending_requirements"] = sys.argv[2]; json.dump(r, open(sys.argv[1], "w"))\' '
        f"{RECORD} {before_head}"
    )
    assert planted.rc == 0, planted.stderr
    frozen = as_pod(enc2, f"{VENV}/bin/pip freeze --disable-pip-version-check").stdout
    stale = run_role("sysv-enc2")
    assert stale.returncode == 0, stale.stdout[-3000:]
    assert f"says that the requirements of commit {before_head} are still" in said(stale)
    assert "does not have the requirements" not in said(stale)
    record = json.loads(enc2.file(RECORD).content_string)
    assert "pending_requirements" not in record and record["requirements"] == tagged, record
    assert as_pod(enc2, f"{VENV}/bin/pip freeze --disable-pip-version-check").stdout == frozen
