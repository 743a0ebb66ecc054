"""check_xapi's configuration as roles/xapi_ops renders it (no container).

Rendered by Ansible itself from the roles' defaults and the lab's settings, for a host that
is a frontal and broker, and for an encoding host, with hostile passwords (every printable
character, quotes, `$(...)`, a backslash): the file must be JSON that gives back each value
exactly, that the plugin itself accepts (`--check-config`, the role's `validate:`), with the
LRS only where a worker runs.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from xapi_testsupport import playbooks
from xapi_testsupport.check_xapi import ship

ROOT = Path(__file__).resolve().parents[1]
_SHIPPED = tempfile.TemporaryDirectory(prefix="check_xapi-")
#: check_xapi as roles/xapi_ops installs it (its launcher and the package's modules).
PLUGIN = ship(Path(_SHIPPED.name))
HOSTILE = string.printable.strip() + " $(touch /tmp/pwned) `id` \"'\\"


INVENTORY = (
    "all:\n  vars:\n    ansible_python_interpreter: /usr/bin/python3\n  children:\n"
    "    pod_frontal:\n      hosts:\n        front1:\n"
    "          ansible_host: 192.0.2.11\n          ansible_connection: local\n"
    "    xapi_broker:\n      hosts:\n        front1:\n"
    "    pod_encodage:\n      hosts:\n        enc1:\n"
    "          ansible_connection: local\n          xapi_encodage_worker_nodes: [a, b]\n"
)


def render(out: Path, inventory: str) -> dict[str, dict]:
    (out / "hosts.yml").write_text(inventory)
    files = [
        ROOT / "roles/xapi/defaults/main.yml",
        ROOT / "roles/xapi_ops/defaults/main.yml",
        ROOT / "roles/xapi_ops/vars/main.yml",
        ROOT / "inventories/lab/group_vars/all/xapi.yml",
    ]
    extra = {
        "xapi_broker_host": "broker.example.org",
        "xapi_lrs_url": "https://lrs.example.org/xAPI/statements/",
        "xapi_broker_monitor_password": HOSTILE,
        "xapi_lrs_password": HOSTILE[::-1],
        "xapi_ops_check_thresholds": {"queue": [5, 50]},
    }
    template = {str(ROOT / "roles/xapi_ops/templates/check_xapi.json.j2"): "check_xapi.json"}
    result = playbooks.render(out, template, files, extra, str(out / "hosts.yml"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return {
        host: json.loads((out / f"{host}-check_xapi.json").read_text())
        for host in ("front1", "enc1")
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return render(tmp_path_factory.mktemp("check-xapi"), INVENTORY)


def test_a_frontal_that_runs_the_worker_checks_its_instance_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The frontal in the group xapi_worker (issue 32): its own instance once, over loopback,
    with the LRS; the plugin accepts the file (the same name twice it refuses)."""
    inventory = INVENTORY + "    xapi_worker:\n      hosts:\n        front1:\n        enc1:\n"
    front = render(tmp_path_factory.mktemp("worker-frontal"), inventory)["front1"]
    assert [(b["name"], b["host"]) for b in front["brokers"]] == [("front1", "127.0.0.1")]
    assert front["lrs"]["url"] == "https://lrs.example.org/xAPI/statements/"
    path = tmp_path_factory.mktemp("worker-frontal-config") / "check_xapi.json"
    path.write_text(json.dumps(front))
    result = subprocess.run(
        [sys.executable, str(PLUGIN), "--check-config", "-C", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hostile_passwords_come_back_exactly(rendered: dict[str, dict]) -> None:
    for config in rendered.values():
        assert [b["password"] for b in config["brokers"]] == [HOSTILE]
    assert rendered["enc1"]["lrs"]["password"] == HOSTILE[::-1]


def test_frontal_checks_its_own_instance_and_the_encoding_host_every_broker(
    rendered: dict[str, dict],
) -> None:
    front, enc = rendered["front1"], rendered["enc1"]
    assert [(b["name"], b["host"]) for b in front["brokers"]] == [("front1", "127.0.0.1")]
    assert "lrs" not in front  # the frontal holds no LRS credentials (roles/xapi_frontal)
    assert [(b["name"], b["host"]) for b in enc["brokers"]] == [("front1", "192.0.2.11")]
    assert enc["lrs"]["url"] == "https://lrs.example.org/xAPI/statements/"
    for config in (front, enc):
        assert config["brokers"][0]["user"] == "xapi-monitor"
        assert (config["brokers"][0]["port"], config["brokers"][0]["db"]) == (6380, 6)
        # Every node of every encoding host consumes from each broker: 2 here.
        assert config["nodes_expected"] == 2
        assert config["thresholds"]["nodes"] == [2, 1]
        assert config["thresholds"]["queue"] == [5, 50]
        assert config["thresholds"]["oldest_age"] == [300, 1800]
        assert config["thresholds"]["spool_depth"] == [1000, 100000]
        assert config["thresholds"]["spool_age"] == [900, 86400]
        assert config["thresholds"]["spool_used"] == [50, 90]


@pytest.mark.parametrize("host", ["front1", "enc1"])
def test_the_plugin_accepts_what_the_role_writes(
    rendered: dict[str, dict], host: str, tmp_path: Path
) -> None:
    path = tmp_path / "check_xapi.json"
    path.write_text(json.dumps(rendered[host]))
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    result = subprocess.run(
        [python, str(PLUGIN), "--check-config", "-C", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert HOSTILE not in result.stdout + result.stderr
