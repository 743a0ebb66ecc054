"""Fixtures of the resilience scenario: the operators' playbook runner and the evidence the
fault run leaves for the intrusion checks (the `ansible-playbook -v` output)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from xapi_testsupport.playbooks import Runner, molecule_inventory, runner

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def playbook() -> Runner:
    """Runs one of the bundle's playbooks as an operator would (site.yml may take minutes)."""
    return runner(molecule_inventory(), timeout=900)


@pytest.fixture(scope="session")
def evidence() -> dict[str, Any]:
    """Filled by test_faults (the playbook run that repairs the LRS password)."""
    return {}


@pytest.fixture(scope="session")
def report_path() -> Path:
    base = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", str(ROOT / ".cache"))
    return Path(base) / "reliability-report.md"
