"""The scenario's hosts are Debian 13 (trixie), and what the bundle relies on there holds.

The other scenarios run Debian 12: together they cover both supported releases. Here:
Redis 8.0 and nftables 1.1 on the frontal, CPython 3.13 everywhere, the worker's venv from
Debian 13's lock, and the lab's Pod release's (4.4.0) requirements-encode.txt with the
bundle's kombu fix on Python 3.13 (a fresh venv as pod, from PyPI), which is what an
operator's Pod venv gets when the role installs Pod's requirements (roles/xapi_encodage_pod:
Pod's pins win, kombu alone is constrained).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hosts import HOSTS, sh
from xapi_testsupport.pod_on_host import POD_DIR, VENV

ROOT = Path(__file__).resolve().parents[3]
CONSTRAINTS = ROOT / "xapi_worker/constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


def pins(text: str) -> dict[str, str]:
    return {name.lower().replace("_", "-"): version for name, version in PIN.findall(text)}


@pytest.mark.parametrize("host", HOSTS)
def test_hosts_run_debian_13(host: str) -> None:
    release = sh(host, ". /etc/os-release && echo $VERSION_ID $VERSION_CODENAME").stdout.split()
    assert release == ["13", "trixie"]
    assert sh(host, "python3 -V").stdout.startswith("Python 3.13.")


def test_broker_is_redis_8_behind_nftables_1_1() -> None:
    assert "v=8.0." in sh("frontal", "redis-server --version").stdout
    assert sh("frontal", "nft --version").stdout.startswith("nftables v1.1.")
    # The instance's AOF is on and the firewall's table is loaded.
    assert "table inet xapi_redis" in sh("frontal", "nft list tables").stdout
    assert sh("frontal", "ls /var/lib/redis/xapi/appendonlydir").stdout.strip()


def test_worker_venv_is_debian_13s_lock() -> None:
    lock = sh("encodage", "cat /usr/local/lib/xapi-worker/requirements.lock").stdout
    assert "Files for Debian 13 / CPython 3.13" in lock
    installed = pins(sh("encodage", "/opt/xapi-worker/bin/python -m pip freeze").stdout)
    assert installed.pop("xapi-worker")
    assert installed == pins(lock)
    assert "async-timeout" not in installed  # redis 5.2.0 needs it below Python 3.11.3 only


def test_pods_venvs_run_celery_5_4_on_python_3_13() -> None:
    """The frontal's Pod venv queued every statement of the fault run (Pod's producer), with
    the kombu the bundle pins; both Pod venvs hold a consistent set on 3.13."""
    for host in ("frontal", "encodage"):
        freeze = pins(sh(host, f"{VENV}/bin/python -m pip freeze").stdout)
        assert (freeze["celery"], freeze["kombu"], freeze["redis"]) == ("5.4.0", "5.5.4", "5.2.0")
        sh(host, f"{VENV}/bin/python -m pip check")
        assert sh(host, f"{VENV}/bin/python -V").stdout.startswith("Python 3.13.")


def test_pods_encoding_requirements_with_the_kombu_fix_on_python_3_13() -> None:
    venv = "/var/tmp/xapi-py313-check"
    kombu = pins(CONSTRAINTS.read_text())["kombu"]
    sh("encodage", f"echo kombu=={kombu} > /var/tmp/xapi-constraints.txt")
    install = sh(
        "encodage",
        f"rm -rf {venv} && runuser -u pod -- sh -c 'python3 -m venv {venv} && "
        f"PIP_CERT=/usr/local/share/lab-ca.pem {venv}/bin/pip install -q "
        f"-c /var/tmp/xapi-constraints.txt -r {POD_DIR}/requirements-encode.txt'",
        timeout=600,
    )
    try:
        sh("encodage", f"{venv}/bin/pip check")
        installed = pins(sh("encodage", f"{venv}/bin/pip freeze").stdout)
        # Pod's own pins, and the kombu fix.
        wanted = pins(sh("encodage", f"cat {POD_DIR}/requirements-encode.txt").stdout)
        wanted["kombu"] = kombu
        assert {name: installed.get(name) for name in wanted} == wanted, install.stderr
        assert installed["requests"] == "2.34.2"
        # What imports Pod's task module, and Celery's worker itself, load on 3.13.
        sh(
            "encodage",
            f"{venv}/bin/python -c 'import celery, kombu, redis, "
            "requests, webvtt; from celery.worker import WorkController; "
            "from kombu.transport import redis as transport'",
        )
    finally:
        sh("encodage", f"rm -rf {venv} /var/tmp/xapi-constraints.txt", check=False)
