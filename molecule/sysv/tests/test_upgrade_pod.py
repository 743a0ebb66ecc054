"""Pod upgraded on purpose on an encoding host, 4.1.0 -> 4.4.0, under traffic (issue 32,
operator guide "Upgrading Pod on the encoding hosts"). sysv-enc2 is a Pod 4.1.0 host
(lab/prepare.yml, host_vars) running Pod's own task module from Pod's venv. While the
frontal queues statements without a pause, the role runs with xapi_encodage_pod_upgrade_from
and _to: the checkout moves (reported from -> to), Pod's venv gets 4.4.0's
requirements-encode.txt (requests 2.32.4 -> 2.34.2) and nothing runs against the database;
every statement sent meanwhile reaches the LRS. Runs last (file order): sysv-enc2 stays on
4.4.0.
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


def test_upgrade_4_1_0_to_4_4_0_under_traffic(frontal, enc2):
    assert as_pod(enc2, f"git -C {POD_DIR} describe --tags --exact-match").stdout.strip() == "4.1.0"
    before_head = as_pod(enc2, f"git -C {POD_DIR} rev-parse HEAD").stdout.strip()
    assert versions(enc2)["requests"] == "2.32.4"
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
        upgraded = run_role("sysv-enc2", *UPGRADE)
        # Statements still flow while the restarted workers come back.
        wait_nodes_ready(enc2)
        time.sleep(2)
    finally:
        frontal.run(f"touch {STOP}")
        traffic.join(timeout=60)
    assert upgraded.returncode == 0, upgraded.stdout[-3000:]
    said = re.sub(r"\s+", " ", upgraded.stdout.replace("''", "'"))
    tagged = enc2.check_output(f"git -C {REPO} rev-parse 4.4.0^{{commit}}")
    assert f"Pod upgraded on sysv-enc2: 4.1.0 ({before_head}) -> 4.4.0 ({tagged})" in said
    assert "requests 2.32.4 -> 2.34.2" in said, said[-3000:]

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
    assert "is already at 4.4.0" in re.sub(r"\s+", " ", again.stdout.replace("''", "'"))
