"""Fixtures of the multi-host tests: one testinfra host per lab role.

Under molecule the containers are named after the platforms (frontal, encodage, lrs); with
`--lab` the same tests run against the demo lab (xapi-lab-frontal, ...). Hosts are reached
with testinfra's podman backend: a `podman exec` per command, much faster than going
through ansible for each.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import testinfra
from xapi_testsupport.playbooks import Runner, molecule_inventory, runner

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
    return molecule_inventory()


@pytest.fixture(scope="session")
def playbook(inventory: str) -> Runner:
    """Runs one of the bundle's playbooks as an operator would."""
    return runner(inventory)
