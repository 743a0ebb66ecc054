"""Fixtures of the sysv scenario: one testinfra host per platform (podman backend)."""

from __future__ import annotations

import os

import pytest
import testinfra

PREFIX = os.environ.get("XAPI_SYSV_PREFIX", "sysv-")


def _host(name: str) -> testinfra.host.Host:
    return testinfra.get_host(f"podman://{PREFIX}{name}")


@pytest.fixture(scope="session")
def frontal() -> testinfra.host.Host:
    return _host("frontal")


@pytest.fixture(scope="session")
def enc1() -> testinfra.host.Host:
    return _host("enc1")


@pytest.fixture(scope="session")
def enc2() -> testinfra.host.Host:
    return _host("enc2")


@pytest.fixture(scope="session")
def lrs() -> testinfra.host.Host:
    return _host("lrs")


@pytest.fixture(scope="session", params=["enc1", "enc2"])
def enc(request: pytest.FixtureRequest) -> testinfra.host.Host:
    """Each encoding host in turn."""
    return request.getfixturevalue(request.param)
