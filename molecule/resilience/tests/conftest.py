"""Fixtures of the resilience scenario: the operators' playbook runner and the evidence the
fault run leaves for the intrusion checks (the `ansible-playbook -v` output)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def inventory() -> str:
    if "MOLECULE_INVENTORY_FILE" in os.environ:
        return str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
    return str(Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory")


@pytest.fixture(scope="session")
def playbook(inventory: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs one of the bundle's playbooks as an operator would."""

    facts = tempfile.mkdtemp(prefix="xapi-facts-")

    def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        # A fact cache of this test session: the repository's (.ansible/facts) may hold the
        # addresses of an earlier scenario's hosts of the same name.
        env = dict(
            os.environ,
            ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
            ANSIBLE_CACHE_PLUGIN_CONNECTION=facts,
        )
        path = ROOT / name if name == "site.yml" else ROOT / "playbooks" / name
        return subprocess.run(
            ["ansible-playbook", "-i", inventory, str(path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def evidence() -> dict[str, Any]:
    """Filled by test_faults (the playbook run that repairs the LRS password)."""
    return {}


@pytest.fixture(scope="session")
def report_path() -> Path:
    base = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", str(ROOT / ".cache"))
    return Path(base) / "reliability-report.md"
