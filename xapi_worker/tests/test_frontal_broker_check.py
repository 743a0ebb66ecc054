"""The frontal's broker preflight (roles/xapi_frontal/files/xapi_frontal_broker_check.py) run
as roles/xapi_frontal/tasks/preflight.yml runs it: the system's python3 -I -c <the check>
<the package's resp.py source>, its configuration on stdin, against a real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from support import REPO, free_port

CHECK = REPO / "roles" / "xapi_frontal" / "files" / "xapi_frontal_broker_check.py"
RESP = REPO / "xapi_worker" / "src" / "xapi_worker" / "resp.py"
PYTHON = os.environ.get("CHECK_XAPI_PYTHON", "/usr/bin/python3")
PASSWORD = "pr0ducer-Pw-$(id)"


def preflight(port: int, **cfg: Any) -> dict[str, Any]:
    settings = {
        "host": "127.0.0.1",
        "port": port,
        "user": "producer",
        "password": PASSWORD,
        "db": 6,
        "tls": False,
        "ca_file": "",
        "timeout": 5,
        "eviction": False,
        **cfg,
    }
    proc = subprocess.run(
        [PYTHON, "-I", "-c", CHECK.read_text(), RESP.read_text()],
        input=json.dumps(settings),
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
        check=True,
    )
    assert PASSWORD not in proc.stdout + proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] == (answer["reason"] == "ok")
    return answer


@pytest.fixture
def broker(redis_srv: Any) -> Any:
    r = redis_srv.client()
    r.acl_setuser(
        "producer",
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        commands=["+auth", "+select", "+ping"],
        keys=["xapi"],
    )
    return redis_srv


def test_ok_then_each_refusal(broker) -> None:
    assert preflight(broker.port)["reason"] == "ok"
    wrong = preflight(broker.port, password="wrong-pw")
    assert wrong["reason"] == "auth_refused" and wrong["detail"].startswith("AUTH: -WRONGPASS")
    assert preflight(broker.port, db=99)["reason"] == "protocol"  # SELECT out of range
    # INFO memory is not the producer's here: the policy cannot be read
    unknown = preflight(broker.port, eviction=True)
    assert unknown["reason"] == "policy_unknown" and "-NOPERM" in unknown["detail"]


def test_eviction_policy(broker) -> None:
    r = broker.client()
    r.execute_command("ACL", "SETUSER", "producer", "+info")
    assert preflight(broker.port, eviction=True) == {
        "ok": True,
        "reason": "ok",
        "detail": "PONG, maxmemory_policy noeviction",
    }
    r.config_set("maxmemory-policy", "allkeys-lru")
    evicts = preflight(broker.port, eviction=True)
    assert (evicts["reason"], evicts["detail"]) == ("evicts", "maxmemory_policy is allkeys-lru")


def test_unreachable() -> None:
    assert preflight(free_port(), timeout=2)["reason"] == "unreachable"


def test_unreadable_ca(tmp_path) -> None:
    """The check runs as nobody (session 5's review, L7): a CA file it cannot read is said as
    such, not as an unreachable broker."""
    answer = preflight(free_port(), tls=True, ca_file=str(tmp_path / "missing-ca.pem"))
    assert answer["reason"] == "ca_unreadable", answer
    assert "missing-ca.pem" in answer["detail"], answer
