"""Bad broker input stops site.yml before any change, with a message naming what is wrong.

A port another program holds (Pod's Redis, 6379), and a broker the bundle does not manage
(xapi_broker_managed: false) that is unreachable, refuses the credentials, or evicts keys.
After each refused run, Pod's Redis, the frontal's settings and the encoding host's worker
settings are as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SETTINGS = "/usr/local/django_projects/podv4/pod/custom/settings_local.py"
WORKER_ENV = "/etc/celeryd-xapi/worker.env"
EVICTING_PORT = 6391


def external(port: int) -> str:
    return json.dumps(
        {"xapi_broker_managed": False, "xapi_broker_host": "127.0.0.1", "xapi_broker_port": port}
    )


@pytest.fixture(scope="module")
def evicting_redis(frontal, settings_password, producer_password):
    """A Redis of the operator's that evicts (allkeys-lru), with the xAPI users (the worker's
    and the producer's, whose credentials the frontal's preflight uses), on the frontal."""
    frontal.check_output(
        f"redis-server --port {EVICTING_PORT} --daemonize yes --save '' --appendonly no "
        f"--maxmemory-policy allkeys-lru --user xapi on '>{settings_password}' '~*' '+@all' "
        f"--user xapi-producer on '>{producer_password}' '~*' '+@all'"
    )
    yield
    frontal.run(f"redis-cli -p {EVICTING_PORT} --user xapi --pass {settings_password} shutdown")


def _lab() -> dict:
    return yaml.safe_load((ROOT / "inventories/lab/group_vars/all/xapi.yml").read_text())


@pytest.fixture(scope="module")
def settings_password() -> str:
    return _lab()["xapi_broker_password"]


@pytest.fixture(scope="module")
def producer_password() -> str:
    return _lab()["xapi_broker_producer_password"]


def checksums(frontal, encodage) -> tuple[str, str, str]:
    return (
        frontal.file(SETTINGS).sha256sum,
        frontal.file("/etc/redis/redis-xapi.conf").sha256sum,
        encodage.file(WORKER_ENV).sha256sum,
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (json.dumps({"xapi_broker_port": 6379}), "xapi_broker_port 6379 is already taken"),
        (external(6399), "UNREACHABLE"),
        (external(6379), "CREDENTIALS REFUSED"),
        (external(EVICTING_PORT), "EVICTS KEYS"),
    ],
    ids=["port-taken", "unreachable", "credentials-refused", "evicts"],
)
def test_refused_before_any_change(playbook, frontal, encodage, evicting_redis, extra, expected):
    before = checksums(frontal, encodage)
    result = playbook("site.yml", "-e", extra)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout[-3000:]
    assert checksums(frontal, encodage) == before
