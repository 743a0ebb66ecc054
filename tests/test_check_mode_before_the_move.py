"""`site.yml --check --diff` on a host of the earlier layout (the worker run as Pod's user):
the worker's user and group do not exist yet, and in --check the run does not make them, so
every task giving an existing path to them failed looking them up (the spool's directory,
/etc/celeryd-xapi): the operator guide's first step stopped there (outside review of the
Ansible code, M3). Now those tasks leave the owner or group out in --check while the account
is still to be made.

Run for real on this machine, in --check, with the settings tasks of roles/xapi_encodage
(user.yml, migrate_user.yml, settings.yml) against a spool and a settings directory under a
root-owned directory of /var/lib, as the earlier layout left them (Pod's user: `nobody`), and
a worker's user that does not exist. Nothing may change.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles/xapi_encodage"
POD = "nobody"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(f"/var/lib/xapi-check-mode-test-{os.getpid()}")
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_check_mode_passes_on_a_host_of_the_earlier_layout(base: Path) -> None:
    pod = pwd.getpwnam(POD)
    spool = base / "spool"
    spool.mkdir(mode=0o700)
    (spool / "xapi.sqlite3").write_text("rows")
    for path in (spool, spool / "xapi.sqlite3"):
        os.chown(path, pod.pw_uid, pod.pw_gid)
    settings = base / "etc"
    settings.mkdir(mode=0o750)
    os.chown(settings, 0, pod.pw_gid)
    worker = f"xapi-chk-{os.getpid()}"
    values = {
        "xapi_encodage_with_pod": False,
        "xapi_encodage_worker_user": worker,
        "xapi_encodage_pod_user": POD,
        "xapi_encodage_spool_dir": str(spool),
        "xapi_encodage_worker_config": str(settings / "worker.env"),
        "xapi_broker_managed": False,
        "xapi_broker_host": "broker.example.org",
        "xapi_broker_password": "a-good-broker-password",
        "xapi_lrs_url": "https://lrs.example.org/xAPI/statements/",
        "xapi_lrs_login": "pod",
        "xapi_lrs_password": "a-good-lrs-password",
    }
    # Extra vars: over the roles' defaults and vars, read as vars_files.
    extra = base / "values.json"
    extra.write_text(json.dumps(values))
    # The role's templates, where a playbook's tasks look for them.
    (base / "templates").symlink_to(ROLE / "templates")
    playbook = base / "check.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars_files": [
                        str(ROOT / "roles/xapi/defaults/main.yml"),
                        str(ROOT / "roles/xapi_encodage_pod/defaults/main.yml"),
                        str(ROLE / "defaults/main.yml"),
                        str(ROLE / "vars/main.yml"),
                    ],
                    "tasks": [
                        {"ansible.builtin.import_tasks": str(ROLE / f"tasks/{name}.yml")}
                        for name in ("spool_checks", "user", "migrate_user", "settings")
                    ],
                }
            ]
        )
    )
    # The role's handlers restart the workers: none here.
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_ERROR_ON_MISSING_HANDLER="false",
    )
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            "localhost,",
            "-c",
            "local",
            "--check",
            "--diff",
            "--tags",
            "settings",
            "-e",
            f"@{extra}",
            str(playbook),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "Give the spool's files to the worker's user" in output, output[-3000:]
    # --check changed nothing: no account, the spool and the settings as they were.
    with pytest.raises(KeyError):
        pwd.getpwnam(worker)
    assert spool.stat().st_uid == pod.pw_uid
    assert (spool / "xapi.sqlite3").stat().st_uid == pod.pw_uid
    assert settings.stat().st_gid == pod.pw_gid
    assert not (settings / "worker.env").exists()
