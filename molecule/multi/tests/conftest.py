"""Fixtures of the multi scenario: one testinfra host per platform (podman backend)."""

from __future__ import annotations

import pytest
import testinfra
from xapi_testsupport.playbooks import Runner, molecule_inventory, runner

FRONTALS = ["multi-frontal1", "multi-frontal2"]


def host(name: str) -> testinfra.host.Host:
    return testinfra.get_host(f"podman://{name}")


@pytest.fixture(scope="session")
def encodage() -> testinfra.host.Host:
    return host("multi-encodage")


@pytest.fixture(scope="session", params=FRONTALS)
def frontal(request: pytest.FixtureRequest) -> testinfra.host.Host:
    """Each frontal in turn."""
    return host(request.param)


@pytest.fixture(scope="session")
def playbook() -> Runner:
    return runner(molecule_inventory())
