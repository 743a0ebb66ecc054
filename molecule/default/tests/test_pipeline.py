"""The operators' check, run as operators run it: playbooks/check.yml on this scenario's hosts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def inventory(container_prefix: str) -> str:
    if container_prefix == "xapi-lab-":
        return str(ROOT / "inventories" / "lab")
    # molecule's inventory directory: its hosts file and the lab's group_vars (linked).
    if "MOLECULE_INVENTORY_FILE" in os.environ:
        return str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
    return str(Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory")


def run_check(inventory: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    return subprocess.run(
        ["ansible-playbook", "-i", inventory, str(ROOT / "playbooks" / "check.yml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_check_playbook_delivers_a_statement(inventory: str) -> None:
    result = run_check(inventory)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "delivered end to end" in result.stdout
