"""roles/xapi_encodage under systemd: Pod's code on the encoding host without touching the
database, and a supervised worker delivering statements end to end (real Redis on the
frontal, real Celery, real Ralph LRS). Each defect of the seed (docs/seed-defects.md) has a
test here or in molecule/sysv (see roles/xapi_encodage/README.md).

Run by molecule (verify), or against the lab: pytest molecule/default/tests/test_encodage.py --lab
"""

from __future__ import annotations

import re
import time

import pytest
from xapi_testsupport.pod_on_host import POD_DIR, VENV, as_pod, delivered, produce
from xapi_testsupport.polling import wait_until
from xapi_testsupport.worker_on_host import WORKER, as_worker

SETTINGS = f"{POD_DIR}/pod/custom/settings_local.py"
DEFAULTS = "/etc/default/celeryd-xapi"
WORKER_ENV = "/etc/celeryd-xapi/worker.env"
# The bundled worker's own venv (roles/xapi_encodage defaults).
WORKER_VENV = "/opt/xapi-worker"
NODE_UNIT = "celeryd-xapi@xapi.service"
RECORD = "/var/log/pod-invocations.log"


def main_pid(host, unit: str = NODE_UNIT) -> int:
    return int(host.check_output(f"systemctl show -p MainPID --value {unit}"))


def wait_active(host, unit: str, old_pid: int, timeout: float = 20) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        pid = main_pid(host, unit)
        if pid not in (0, old_pid) and host.run(f"systemctl is-active {unit}").rc == 0:
            return time.monotonic() - start
        time.sleep(0.5)
    pytest.fail(f"{unit} not back within {timeout} s")


def wait_ready(host, unit: str = NODE_UNIT, timeout: float = 30) -> None:
    """Until the worker has logged `ready` since its current start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        since = host.check_output(f"systemctl show -p ActiveEnterTimestamp --value {unit}").strip()
        log = host.run(f"journalctl -u {unit} --since '{since}' --no-pager -o cat")
        if " ready." in log.stdout:
            return
        time.sleep(1)
    pytest.fail(f"{unit} never logged `ready`")


def secrets_of(host) -> list[str]:
    """The LRS and broker passwords, from the bundled worker's settings (read as root)."""
    text = host.file(WORKER_ENV).content_string
    pwd = re.search(r'^XAPI_LRS_PWD="(.*)"$', text, re.M).group(1)
    broker = re.search(r'^XAPI_CELERY_BROKER_URL="(.*)"$', text, re.M).group(1)
    broker_pwd = re.match(r"rediss?://[^:/@]*:([^@]*)@", broker).group(1)
    return [pwd, broker_pwd]


# --- Pod on the encoding host, database untouched -------------------------------------------


def test_pod_checked_out_at_the_tag_by_pod(encodage):
    assert encodage.user("pod").exists
    assert encodage.file(POD_DIR).user == "pod"
    tag = as_pod(encodage, f"git -C {POD_DIR} describe --tags --exact-match")
    assert tag.stdout.strip() == "4.4.0", tag.stderr


def test_no_database_or_index_command_ran(encodage):
    """The stand-in manage.py and Makefile record every call: none may have happened."""
    record = encodage.file(RECORD)
    assert record.exists, "lab/prepare.yml makes the record"
    assert record.content_string == "", record.content_string


def test_no_encoding_web_or_search_stack(encodage):
    for package in ("ffmpeg", "nginx", "uwsgi", "elasticsearch"):
        assert not encodage.package(package).is_installed, package
    for command in ("ffmpeg", "nginx", "uwsgi"):
        assert encodage.run(f"command -v {command}").rc != 0, command


def test_worker_venv_of_its_own_with_the_proven_pins(encodage):
    """The bundled worker runs from its own root-owned venv, with the pins proven with Pod's
    requirements-encode.txt (kombu 5.5.4 with redis 5.2.0: docs/seed-defects.md)."""
    venv = encodage.file(WORKER_VENV)
    assert (venv.user, venv.mode) == ("root", 0o755)
    writable = encodage.run(f"find {WORKER_VENV} -not -user root -o -perm /022 -not -type l")
    assert writable.stdout.strip() == ""
    versions = encodage.check_output(
        f"{WORKER_VENV}/bin/python -c \"import importlib.metadata as m; print(' '.join("
        "m.version(p) for p in ('celery', 'kombu', 'redis', 'requests', 'xapi-worker')))\""
    )
    assert versions.split()[:4] == ["5.4.0", "5.5.4", "5.2.0", "2.32.4"]


def test_pods_venv_keeps_a_working_kombu(encodage):
    """Pod's own venv (its encoding worker's) is left to Pod; its kombu works with redis 5.2.0."""
    versions = encodage.check_output(
        f"{VENV}/bin/python -c \"import importlib.metadata as m; print(' '.join("
        "m.version(p) for p in ('celery', 'kombu', 'redis')))\""
    )
    assert versions.split() == ["5.4.0", "5.5.4", "5.2.0"]


# --- Settings --------------------------------------------------------------------------------


def test_no_xapi_secret_in_pods_settings_with_the_bundled_worker(encodage):
    """Security review 2 (round two): the bundled worker never reads settings_local.py, which
    pod reads: no xAPI block there (earlier releases wrote one, with both passwords)."""
    settings = encodage.file(SETTINGS)
    if settings.exists:
        text = settings.content_string
        assert "xAPI settings managed by Ansible" not in text
        assert not re.search(r"^XAPI_(LRS_PWD|LRS_LOGIN|CELERY_BROKER_URL)\b", text, re.M)
        for secret in secrets_of(encodage):
            assert secret not in text


def test_broker_is_the_frontal_with_authentication(encodage, frontal):
    """Seed defect 8: not the Docker name `redis`, but the frontal, with a password."""
    url = re.search(
        r'^XAPI_CELERY_BROKER_URL="(.*)"$', encodage.file(WORKER_ENV).content_string, re.M
    ).group(1)
    match = re.match(r"rediss?://([^:@/]+):([^@]+)@([^:/]+):(\d+)/6", url)
    assert match, "broker URL with user, password, host, port and db 6"
    host = match.group(3)
    assert host != "redis"
    assert host in {
        frontal.backend.get_hostname(),
        frontal.check_output("hostname"),
        *frontal.check_output("hostname -I").split(),
    }


def test_worker_settings_file_for_the_workers_user_only(encodage):
    folder, env = encodage.file("/etc/celeryd-xapi"), encodage.file(WORKER_ENV)
    assert (folder.user, folder.group, folder.mode) == ("root", WORKER, 0o750)
    assert (env.user, env.group, env.mode) == ("root", WORKER, 0o640)
    assert as_worker(encodage, f"test -r {WORKER_ENV}").rc == 0
    assert as_pod(encodage, f"cat {WORKER_ENV}").rc != 0
    assert encodage.run(f"runuser -u nobody -- cat {WORKER_ENV}").rc != 0


def test_defaults_file_is_correct(encodage):
    """Seed defects 1, 2, 4, 6, 7, 10 (docs/seed-defects.md)."""
    defaults = encodage.file(DEFAULTS)
    assert defaults.user == "root"
    assert defaults.mode & 0o022 == 0, oct(defaults.mode)
    text = defaults.content_string
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in lines if "CELERY_ROUTES" in line]
    assert not [line for line in lines if "DJANGO_SETTINGS_MODULE" in line]
    opts = re.search(r'^CELERYD_OPTS="(.*)"$', text, re.M).group(1)
    assert "-Q xapi" in opts
    assert "--max-tasks-per-child" not in opts
    assert "86400" not in opts
    assert f'CELERY_BIN="{WORKER_VENV}/bin/celery"' in text
    assert encodage.file(f"{WORKER_VENV}/bin/celery").is_executable
    assert f'XAPI_WORKER_CONFIG="{WORKER_ENV}"' in text
    assert encodage.run(f"sh -n {DEFAULTS}").rc == 0
    for secret in secrets_of(encodage):
        assert secret not in text


# --- Service ---------------------------------------------------------------------------------


def test_units_enabled_sandboxed_and_supervised(encodage):
    """Seed defect 9 (enabled at boot); restart after a crash (docs/upstream-facts.md §3)."""
    assert encodage.run("systemctl is-enabled celeryd-xapi.service").stdout.strip() == "enabled"
    assert encodage.run(f"systemctl is-enabled {NODE_UNIT}").stdout.strip() == "enabled"
    shown = encodage.check_output(
        f"systemctl show {NODE_UNIT} -p Type -p Restart -p User -p NoNewPrivileges "
        "-p ProtectSystem -p ProtectHome -p PrivateTmp -p WorkingDirectory -p ActiveState "
        "-p EnvironmentFiles"
    ).splitlines()
    props = dict(line.split("=", 1) for line in shown)
    # One EnvironmentFiles= line per file: the defaults file first, then the node's broker.
    env_files = [line.split("=", 1)[1] for line in shown if line.startswith("EnvironmentFiles=")]
    assert props["ActiveState"] == "active"
    assert props["Type"] == "exec"
    assert props["Restart"] == "always"
    assert props["User"] == WORKER
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "yes"
    assert props["PrivateTmp"] == "yes"
    assert props["WorkingDirectory"] == WORKER_VENV
    assert env_files[0].startswith(DEFAULTS)
    assert env_files[1].startswith("/etc/celeryd-xapi/broker-xapi.env")
    assert not encodage.file("/etc/init.d/celeryd-xapi").exists


def test_worker_runs_as_its_own_user_on_queue_xapi(encodage):
    pid = main_pid(encodage)
    assert pid > 0
    assert encodage.check_output(f"ps -o user= -p {pid}").strip() == WORKER
    assert encodage.check_output(f"readlink /proc/{pid}/cwd").strip() == WORKER_VENV
    cmdline = encodage.file(f"/proc/{pid}/cmdline").content_string.replace("\0", " ")
    assert "-A xapi_worker.app worker" in cmdline
    assert "-Q xapi" in cmdline
    assert "--max-tasks-per-child" not in cmdline
    assert "--time-limit" not in cmdline


def test_documented_checks_answer(encodage):
    """Seed defect 3: the seed's check lacks `worker`; the README gives working checks."""
    check = as_worker(
        encodage, f"env XAPI_WORKER_CONFIG={WORKER_ENV} {WORKER_VENV}/bin/xapi-worker check"
    )
    assert check.rc == 0, check.stdout + check.stderr
    ping = as_worker(
        encodage,
        f"env XAPI_WORKER_CONFIG={WORKER_ENV} "
        f"{WORKER_VENV}/bin/celery -A xapi_worker.app inspect ping -t 10",
        cwd=WORKER_VENV,
    )
    assert ping.rc == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr


def test_statement_delivered_end_to_end(encodage, frontal):
    """Pod's own producer -> Redis on the frontal -> worker -> LRS, read back by id."""
    wait_ready(encodage)
    statement_id = produce(frontal)
    assert delivered(frontal, statement_id), statement_id


def test_worker_back_within_seconds_after_kill_9(encodage, frontal):
    wait_ready(encodage)
    old = main_pid(encodage)
    encodage.run(f"kill -9 {old}")
    elapsed = wait_active(encodage, NODE_UNIT, old)
    assert elapsed < 10, elapsed
    wait_ready(encodage)
    statement_id = produce(frontal)
    assert delivered(frontal, statement_id), statement_id


def test_systemctl_restart_celeryd_xapi_restarts_every_node(encodage):
    old = main_pid(encodage)
    assert encodage.run("systemctl restart celeryd-xapi").rc == 0
    wait_active(encodage, NODE_UNIT, old)


def test_nodes_follow_the_inventory_both_ways(encodage, frontal, playbook):
    """A node added to xapi_encodage_worker_nodes is started; one removed from it is stopped
    and disabled (found in celeryd-xapi.service.wants), the others left running."""
    added = playbook("xapi_encodage.yml", "-e", '{"xapi_encodage_worker_nodes": ["xapi", "xapi2"]}')
    assert added.returncode == 0, added.stdout[-3000:]
    # The handler's restart of the group may still be stopping the old processes.
    assert wait_until(
        lambda: encodage.run("systemctl is-active celeryd-xapi@xapi2.service").rc == 0, 60
    )
    removed = playbook("xapi_encodage.yml")
    assert removed.returncode == 0, removed.stdout[-3000:]
    assert "item=celeryd-xapi@xapi2.service" in removed.stdout
    assert encodage.run("systemctl is-active celeryd-xapi@xapi2.service").rc != 0
    assert encodage.run("systemctl is-enabled celeryd-xapi@xapi2.service").stdout.strip() == (
        "disabled"
    )
    assert wait_until(lambda: encodage.run(f"systemctl is-active {NODE_UNIT}").rc == 0, 60)
    wait_ready(encodage)
    statement_id = produce(frontal)
    assert delivered(frontal, statement_id), statement_id


def test_no_secret_in_the_worker_log(encodage):
    journal = encodage.check_output("journalctl -u 'celeryd-xapi*' --no-pager -o cat")
    # The bundled worker's transport (xapi_worker/transport.py) is named xapi-redis.
    assert "Connected to xapi-redis://xapi:**@" in journal  # the URL is there, masked
    for secret in secrets_of(encodage):
        assert secret not in journal
