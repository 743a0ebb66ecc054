"""The broker's variables of earlier releases (roles/redis's redis_*, now roles/xapi_broker's
xapi_broker_*, issue #35) are refused before anything runs, naming the old and the new name.

Each case runs a playbook in check mode against this machine (a local connection in every group
of a throw-away inventory) whose group_vars still set old names: the run stops at the refusal,
the first task of its first play, and no other task runs.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: As an inventory of the last release wrote them (inventories/production/group_vars).
OLD = {
    "redis_maxmemory": "512mb",
    "redis_migrate_from_password": "a-login-of-pods-redis",
    "redis_tls_ca": "files/broker-ca.crt",
}
NEW = {
    "redis_maxmemory": "xapi_broker_maxmemory",
    "redis_migrate_from_password": "xapi_broker_migrate_from_password",
    "redis_tls_ca": "xapi_broker_server_tls_ca",
}
GOOD = {
    "xapi_broker_password": "a-good-broker-password",
    "xapi_broker_producer_password": "a-good-producer-password",
    "xapi_lrs_url": "https://lrs.example.org/xAPI/statements/",
    "xapi_lrs_login": "pod",
    "xapi_lrs_password": "a-good-lrs-password",
}


def inventory(tmp_path: Path, broker_vars: dict[str, str]) -> Path:
    groups = "".join(
        f"    {group}:\n      hosts:\n        localhost:\n"
        for group in ("pod_frontal", "pod_encodage", "xapi_broker")
    )
    (tmp_path / "hosts.yml").write_text(
        "all:\n  vars:\n    ansible_connection: local\n"
        "    ansible_python_interpreter: /usr/bin/python3\n  children:\n" + groups
    )
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text(
        "".join(f"{key}: {value}\n" for key, value in GOOD.items())
    )
    (tmp_path / "group_vars" / "xapi_broker.yml").write_text(
        "".join(f"{key}: {value}\n" for key, value in broker_vars.items())
    )
    return tmp_path / "hosts.yml"


def check_run(hosts: Path, playbook: str, *args: str) -> tuple[int, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    result = subprocess.run(
        ["ansible-playbook", "-i", str(hosts), "--check", *args, str(ROOT / playbook)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def tasks_run(output: str) -> list[str]:
    """The tasks the run started, but the facts a play gathers (read-only)."""
    tasks = re.findall(r"^TASK \[(.*?)\] \*", output, flags=re.M)
    return [task for task in tasks if task != "Gathering Facts"]


@pytest.mark.parametrize(
    "playbook", ["site.yml", "playbooks/redis.yml", "playbooks/redis-migrate.yml"]
)
def test_old_names_are_refused_before_anything_runs(tmp_path: Path, playbook: str) -> None:
    returncode, output = check_run(inventory(tmp_path, OLD), playbook)
    assert returncode != 0, output[-3000:]
    flat = " ".join(output.split())
    for old, new in NEW.items():
        assert f"{old} -> {new}" in flat, flat[-3000:]
    assert "Nothing was changed." in flat
    # The refusal is the first task of the run: nothing checked or changed before it.
    assert tasks_run(output) == [
        "Refuse the broker variables of earlier releases",
        "xapi : Refuse the broker variables of earlier releases",
    ], tasks_run(output)
    assert "changed=0" in output and "failed=1" in output, output[-2000:]


def test_an_old_name_given_on_the_command_line_is_refused(tmp_path: Path) -> None:
    returncode, output = check_run(
        inventory(tmp_path, {}), "playbooks/redis.yml", "-e", "redis_bind=['127.0.0.1']"
    )
    assert returncode != 0, output[-3000:]
    assert "redis_bind -> xapi_broker_bind" in " ".join(output.split()), output[-3000:]
    assert len(tasks_run(output)) == 2, tasks_run(output)


def test_the_new_names_pass(tmp_path: Path) -> None:
    """The same settings under their new names go past the refusal into the broker's own
    checks (which this machine, no Redis instance of the bundle's here, may then stop)."""
    hosts = inventory(tmp_path, {NEW[old]: value for old, value in OLD.items()})
    _, output = check_run(hosts, "playbooks/redis.yml")
    assert "Renamed variables" not in output, output[-3000:]
    assert "xapi_broker : Check the cross-field rules of the broker settings" in output, output[
        -3000:
    ]


def test_the_check_can_be_skipped_by_its_tag(tmp_path: Path) -> None:
    """A site whose own roles use such a name for Pod's Redis (geerlingguy.redis:
    redis_maxmemory) runs with --skip-tags xapi_renamed once it sets the new names."""
    hosts = inventory(tmp_path, {"redis_maxmemory": "64mb"})
    _, output = check_run(hosts, "playbooks/redis.yml", "--skip-tags", "xapi_renamed")
    assert "Renamed variables" not in output, output[-3000:]
    assert "xapi_broker : Check the cross-field rules of the broker settings" in output
