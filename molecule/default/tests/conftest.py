"""Fixtures of the multi-host tests: one testinfra host per lab role.

Under molecule the containers are named after the platforms (frontal, encodage, lrs); with
`--lab` the same tests run against the demo lab (xapi-lab-frontal, ...). Hosts are reached
with testinfra's podman backend: a `podman exec` per command, much faster than going
through ansible for each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import testinfra

# Helpers shared by the scenarios' tests (molecule/shared).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

ROOT = Path(__file__).resolve().parents[3]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lab", action="store_true", help="run against the `make demo` lab")


@pytest.fixture(scope="session")
def container_prefix(request: pytest.FixtureRequest) -> str:
    if request.config.getoption("--lab") or os.environ.get("XAPI_TEST_TARGET") == "lab":
        return "xapi-lab-"
    return os.environ.get("XAPI_TEST_PREFIX", "")


def _host(prefix: str, name: str) -> testinfra.host.Host:
    return testinfra.get_host(f"podman://{prefix}{name}")


@pytest.fixture(scope="session")
def frontal(container_prefix: str) -> testinfra.host.Host:
    return _host(container_prefix, "frontal")


@pytest.fixture(scope="session")
def encodage(container_prefix: str) -> testinfra.host.Host:
    return _host(container_prefix, "encodage")


@pytest.fixture(scope="session")
def lrs(container_prefix: str) -> testinfra.host.Host:
    return _host(container_prefix, "lrs")


@pytest.fixture(scope="session")
def inventory(container_prefix: str) -> str:
    """The inventory operators' playbooks run with: the lab's, or molecule's (its hosts and
    the lab's group_vars, linked by molecule.yml)."""
    if container_prefix == "xapi-lab-":
        return str(ROOT / "inventories" / "lab")
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
        return subprocess.run(
            ["ansible-playbook", "-i", inventory, str(ROOT / "playbooks" / name), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )

    return run
