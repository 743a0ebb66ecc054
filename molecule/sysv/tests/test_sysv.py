"""roles/xapi_encodage with Celery's generic init script (service manager sysv): two
encoding hosts, two worker nodes each; sysv-enc1 runs the bundled worker, sysv-enc2 Pod's own
task module. Covers the seed's defects (docs/seed-defects.md) on the init-script path, and delivery
through each host while the other's workers are stopped.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from xapi_testsupport.pod_on_host import (
    POD_DIR,
    VENV,
    as_pod,
    as_pod_python,
    delivered,
    produce,
    site_snapshots,
)

ROOT = Path(__file__).resolve().parents[3]
DEFAULTS = "/etc/default/celeryd-xapi"
INITD = "/etc/init.d/celeryd-xapi"
SDIST = "/usr/local/lib/xapi-worker/init-script/celery-5.4.0.tar.gz"
MEMBER = "celery-5.4.0/extra/generic-init.d/celeryd"
NODES = ("xapi1", "xapi2")
APP = {"sysv-enc1": "xapi_worker.app", "sysv-enc2": "pod.xapi.xapi_tasks"}
# The venv each one runs from: the bundled worker's own, Pod's for Pod's task module.
RUN_VENV = {"sysv-enc1": "/opt/xapi-worker", "sysv-enc2": VENV}
# The user each one runs as: the bundled worker's own, Pod's for Pod's task module.
RUN_USER = {"sysv-enc1": "xapi-worker", "sysv-enc2": "pod"}
# Their logs and pid files (roles/xapi_encodage: xapi_encodage_sysv_log_dir, _pid_dir).
LOG_DIR = "/var/log/celeryd-xapi"
PID_DIR = "/run/celeryd-xapi"
# What each app logs for a statement it delivered.
DELIVERED_LOG = {
    "sysv-enc1": r"delivered batch: \d+ statements, HTTP 20",
    "sysv-enc2": r"Task pod\.xapi\.xapi_tasks\.send_xapi_statement_task\[[^]]+\] succeeded",
}


def name_of(host) -> str:
    return host.backend.get_hostname()


def worker_pids(host) -> list[int]:
    """The xAPI workers' processes (not Pod's encoding worker, `--app=pod.main`, on sysv-enc2)."""
    user = RUN_USER[name_of(host)]
    found = host.run(f"pgrep -u {user} -f -- '--app=(xapi_worker[.]app|pod[.]xapi[.]xapi_tasks) '")
    return [int(pid) for pid in found.stdout.split()]


def node_pids(host) -> dict[str, int]:
    pids = {}
    for node in NODES:
        pidfile = host.file(f"{PID_DIR}/{node}.pid")
        if pidfile.exists:
            pids[node] = int(pidfile.content_string.strip())
    return pids


def delivered_count(host) -> int:
    logs = host.run(f"cat {LOG_DIR}/xapi1.log {LOG_DIR}/xapi2.log").stdout
    return len(re.findall(DELIVERED_LOG[name_of(host)], logs))


def wait_nodes_ready(host, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [
            node
            for node in NODES
            if host.run(f"grep -q ' ready\\.' {LOG_DIR}/{node}.log").rc == 0
            and host.run(f"kill -0 $(cat {PID_DIR}/{node}.pid)").rc == 0
        ]
        if len(ready) == len(NODES):
            return
        time.sleep(1)
    pytest.fail(f"{name_of(host)}: worker nodes not ready")


# --- The init script -------------------------------------------------------------------------


def test_node_logs_rotate_and_the_nodes_keep_writing(enc):
    """/etc/logrotate.d/celeryd-xapi names the xAPI nodes' logs only (Pod's encoding worker
    logs elsewhere) and rotates them as the workers' user, in place (copytruncate)."""
    wait_nodes_ready(enc)
    config = enc.file("/etc/logrotate.d/celeryd-xapi")
    assert config.user == "root" and config.mode == 0o644
    named = re.findall(r"^(/\S+)$", config.content_string, re.M)
    assert named == [f"{LOG_DIR}/{node}.log" for node in NODES]
    user = RUN_USER[name_of(enc)]
    assert re.search(rf"^\s*su {user} {user}$", config.content_string, re.M)
    logs = enc.file(LOG_DIR)
    assert (logs.user, logs.group, logs.mode) == (user, user, 0o750)
    before = {node: enc.file(f"{LOG_DIR}/{node}.log").size for node in NODES}
    assert all(before.values())
    pids = node_pids(enc)
    forced = enc.run("logrotate --force /etc/logrotate.d/celeryd-xapi")
    assert forced.rc == 0, forced.stderr
    for node in NODES:
        rotated = enc.file(f"{LOG_DIR}/{node}.log.1")
        assert rotated.exists and rotated.user == user and rotated.size >= before[node]
        assert enc.file(f"{LOG_DIR}/{node}.log").size < before[node]
    # In place: the nodes were neither restarted nor signalled, and still run.
    assert node_pids(enc) == pids
    for pid in pids.values():
        assert enc.run(f"kill -0 {pid}").rc == 0
    # The later tests read the nodes' start in their logs: put the rotated part back.
    for node in NODES:
        log = f"{LOG_DIR}/{node}.log"
        enc.check_output(
            f"cat {log}.1 {log} > {log}.whole && cat {log}.whole > {log} && rm {log}.1 {log}.whole"
        )


def test_init_script_is_celerys_generic_one_from_the_sdist(enc):
    """Seed defect 5, docs/upstream-facts.md §3: the sdist's script, named as its defaults
    file, LSB renamed."""
    script = enc.file(INITD)
    assert (script.user, script.group, script.mode) == ("root", "root", 0o755)
    assert enc.file(SDIST).exists
    diff = enc.run(f"tar -xzOf {SDIST} {MEMBER} | diff - {INITD}")
    changed = [line for line in diff.stdout.splitlines() if line[:2] in ("< ", "> ")]
    assert changed == ["< # Provides:          celeryd", "> # Provides:          celeryd-xapi"]


def test_no_alias_clash_and_enabled_at_boot(enc):
    """Seed defects 5 (Provides: celeryd became an alias) and 9 (nothing enabled it)."""
    names = enc.check_output("systemctl show -p Names --value celeryd-xapi.service")
    assert names.split() == ["celeryd-xapi.service"]
    assert enc.run("systemctl is-enabled celeryd-xapi").stdout.strip() == "enabled"
    assert enc.run("ls /etc/rc2.d/ | grep -q '^S[0-9]*celeryd-xapi$'").rc == 0


def test_defaults_file(enc):
    """Seed defects 1, 2, 4, 6, 7, 10; su for a user without login shell."""
    defaults = enc.file(DEFAULTS)
    assert defaults.user == "root"
    assert defaults.mode & 0o022 == 0
    text = defaults.content_string
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in lines if "CELERY_ROUTES" in line or "DJANGO_SETTINGS" in line]
    opts = re.search(r'^CELERYD_OPTS="(.*)"$', text, re.M).group(1)
    assert "-Q xapi" in opts
    assert "--max-tasks-per-child" not in opts and "86400" not in opts
    assert f'CELERY_BIN="{RUN_VENV[name_of(enc)]}/bin/celery"' in text
    assert f'CELERY_APP="{APP[name_of(enc)]}"' in text
    assert 'CELERYD_NODES="xapi1 xapi2"' in text
    # sysv-enc1 had no Pod: the role made pod without a login shell; its bundled worker runs
    # as its own user, which has none either, so su needs one. sysv-enc2 is a Pod
    # remote-encoding host whose pod user (Pod's docs: a shell) runs Pod's task module.
    fresh = name_of(enc) == "sysv-enc1"
    assert enc.user("pod").shell == ("/usr/sbin/nologin" if fresh else "/bin/bash")
    assert ('CELERYD_SU_ARGS="-s /bin/sh"' in text) == fresh
    user = RUN_USER[name_of(enc)]
    assert f'CELERYD_USER="{user}"' in text
    assert f'CELERYD_CHDIR="{"/opt/xapi-worker" if fresh else POD_DIR}"' in text
    assert f'CELERYD_PID_FILE="{PID_DIR}/%n.pid"' in text
    # stopwait's log file: without it celery makes /var/log/celery as the workers' user.
    assert f'DAEMON_OPTS="--logfile={LOG_DIR}/%n%I.log"' in text
    exported = 'export XAPI_WORKER_CONFIG="/etc/celeryd-xapi/worker.env"' in text
    assert exported == (name_of(enc) == "sysv-enc1")


def test_two_nodes_run_as_the_workers_user_on_queue_xapi(enc):
    wait_nodes_ready(enc)
    pids = node_pids(enc)
    assert sorted(pids) == list(NODES)
    for node, pid in pids.items():
        assert enc.check_output(f"ps -o user= -p {pid}").strip() == RUN_USER[name_of(enc)]
        cmdline = enc.file(f"/proc/{pid}/cmdline").content_string.replace("\0", " ")
        assert f"-n {node}@{name_of(enc)}" in cmdline
        assert "-Q xapi" in cmdline


def test_no_database_or_index_command_ran(enc):
    assert enc.file("/var/log/pod-invocations.log").content_string == ""


def test_venv_pins(enc):
    """The venv each worker runs from: the bundled worker's own, or Pod's for its task module."""
    kombu = enc.check_output(
        f"{RUN_VENV[name_of(enc)]}/bin/python -c "
        "\"import importlib.metadata as m; print(m.version('kombu'))\""
    )
    assert kombu == "5.5.4"


def test_pods_encoding_worker_untouched(enc2):
    """sysv-enc2 is also a Pod remote-encoding host (lab/prepare.yml): its encoding worker
    (/etc/init.d/celeryd, pod.main) runs on, never restarted, its files byte for byte."""
    before, now = site_snapshots(enc2)
    assert before["pod_workers"] and now["pod_workers"] == before["pod_workers"]
    assert before["files"]["/etc/init.d/celeryd"] and now["files"] == before["files"]


# --- Delivery through each host ---------------------------------------------------------------


@pytest.mark.parametrize("serving, stopped", [("enc1", "enc2"), ("enc2", "enc1")])
def test_delivery_through_one_host_while_the_other_is_stopped(request, frontal, serving, stopped):
    serving_host = request.getfixturevalue(serving)
    stopped_host = request.getfixturevalue(stopped)
    wait_nodes_ready(serving_host)
    assert stopped_host.run("systemctl stop celeryd-xapi").rc == 0
    try:
        deadline = time.monotonic() + 30
        while worker_pids(stopped_host) and time.monotonic() < deadline:
            time.sleep(1)
        assert not worker_pids(stopped_host), "workers still running after stop"
        before = delivered_count(serving_host)
        # Pod's producer is the frontal's (sysv-enc1 is a bare host: it has no Pod venv).
        statement_id = produce(frontal)
        assert delivered(frontal, statement_id), statement_id
        deadline = time.monotonic() + 10
        while delivered_count(serving_host) <= before and time.monotonic() < deadline:
            time.sleep(1)
        assert delivered_count(serving_host) > before, "the serving host's log shows it"
    finally:
        assert stopped_host.run("systemctl start celeryd-xapi").rc == 0
    wait_nodes_ready(stopped_host)


# --- A locally modified Pod checkout is never reset -------------------------------------------


def molecule_inventory() -> str:
    found = os.environ.get("MOLECULE_INVENTORY_FILE") or next(
        iter(sorted(glob.glob(os.path.expanduser("~/.ansible/tmp/molecule.*.sysv/inventory")))),
        "",
    )
    if not found:
        pytest.skip("no molecule inventory (run under `molecule verify -s sysv`)")
    return found


def run_role(
    limit: str, *extra: str, playbook: str = "xapi_encodage.yml"
) -> subprocess.CompletedProcess[str]:
    # The project's ansible.cfg (roles path, YAML output); the inventory is molecule's.
    # Plain output to parse: molecule's verifier environment forces colours.
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env.pop("ANSIBLE_FORCE_COLOR", None)
    result = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            molecule_inventory(),
            str(ROOT / "playbooks" / playbook),
            "--limit",
            limit,
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    result.stdout = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    return result


def test_local_changes_of_pod_are_kept(enc2):
    """sysv-enc2 is on Pod 4.1.0 and the inventory names 4.4.0 (for fresh hosts): its
    checkout never moves unasked, local changes or not; an upgrade asked on purpose refuses
    to discard the changes."""
    readme = f"{POD_DIR}/README.md"
    patch = "# local patch of this site"
    head = as_pod(enc2, f"git -C {POD_DIR} rev-parse HEAD").stdout.strip()
    enc2.run(f"echo '{patch}' >> {readme}")
    try:
        same_version = run_role("sysv-enc2")
        assert same_version.returncode == 0, same_version.stdout[-3000:]
        assert re.search(r"sysv-enc2\s+:.*changed=0", same_version.stdout)
        assert enc2.file(readme).content_string.rstrip().endswith(patch)
        # The upgrade asked on purpose: it would have to move the modified checkout.
        upgrade = run_role(
            "sysv-enc2",
            "-e",
            "xapi_encodage_pod_upgrade_from=4.1.0",
            "-e",
            "xapi_encodage_pod_upgrade_to=4.4.0",
        )
        assert upgrade.returncode != 0
        assert "has local changes; the role will not discard them" in upgrade.stdout
        assert "README.md" in upgrade.stdout
        assert enc2.file(readme).content_string.rstrip().endswith(patch)
    finally:
        as_pod(enc2, "git checkout -- README.md", cwd=POD_DIR)
    assert as_pod(enc2, f"git -C {POD_DIR} status --porcelain").stdout == ""
    assert as_pod(enc2, f"git -C {POD_DIR} rev-parse HEAD").stdout.strip() == head


def test_statements_left_in_pod_redis_moved_exactly_once(frontal, enc2):
    """The seed-style site of prepare.yml had 20 statements in db 6 of Pod's Redis, one of them
    in Celery's `unacked` hash beside an entry planted there by pod that is no message: every
    statement is in the LRS after site.yml, nothing of xAPI is left in Pod's Redis but the
    planted entry, as it was (an entry that could not be read stopped the move, on every
    run), and nothing waits to be delivered again in the instance."""
    ids = frontal.file("/var/lib/xapi-lab/seed-statements.txt").content_string.split()
    assert len(ids) == 20
    missing = [i for i in ids if not delivered(frontal, i, timeout=60)]
    assert missing == []
    assert frontal.check_output("redis-cli -n 6 DBSIZE") == "1"
    assert frontal.check_output("redis-cli -n 6 HGETALL unacked") == "planted-by-pod\nnot a message"
    # The instance holds the token of the one move, and nothing queued or unacknowledged.
    # Read with an encoding host's settings (the worker's user): the frontal's name Pod's
    # producer, which may not read xapi.migrated or unacked (roles/xapi_broker README).
    state = as_pod_python(
        enc2,
        "import redis\nfrom pod.custom import settings_local as s\n"
        "r = redis.Redis.from_url(s.XAPI_CELERY_BROKER_URL)\n"
        "print(len(r.smembers('xapi.migrated')), r.llen('xapi'), r.hlen('unacked'))",
    )
    assert state.rc == 0, state.stderr
    assert state.stdout.split() == ["1", "0", "0"]
