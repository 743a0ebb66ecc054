"""The broker's two ACL users, rendered from the roles' defaults (no container).

Security review point 4: the web application (Pod on the frontal) and the workers used to
share one Redis user, so stolen web-app credentials could read and delete the queued
statements, the in-flight lists, `unacked` and the dead letters, stop the workers through
remote control and run Lua. The producer now has its own user, limited to what `.delay()`
needs (roles/xapi_broker README, "The producer's ACL").

`users.acl` and the two broker URLs are rendered by Ansible itself from roles/xapi and
roles/xapi_broker defaults (plus the lab's passwords), as the roles would. Then:
- the producer's line is read token by token: no dangerous command, no channel;
- when a redis-server is installed (`make system-deps` installs one for the worker's tests)
  the file is loaded into a throw-away server (unix socket only, no port) and every
  command is asked of it with `ACL DRYRUN`: the producer may run exactly what `.delay()`
  runs, on exactly its keys, and nothing else; the worker's user keeps what it had.

Run with the tools venv: `pytest tests/test_broker_acl.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from xapi_testsupport import playbooks
from xapi_testsupport.broker import PRODUCER_REFUSED

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# The broker's two URLs, rendered beside the ACL file.
URLS = "{{ {'worker': xapi_broker_url, 'producer': xapi_broker_producer_url} | to_json }}\n"


# What `.delay()` of Pod's task runs (kombu 5.5.4, redis-py 5.2.0), measured with ACL LOG
# against Redis 7.0.15: (command..., expected "OK").
PRODUCER_NEEDS = [
    ["SELECT", "6"],
    ["PING"],
    ["MULTI"],
    ["EXEC"],
    ["LLEN", "xapi"],
    ["LLEN", "xapi\x06\x163"],
    ["SADD", "_kombu.binding.xapi", "xapi\x06\x16\x06\x16xapi"],
    ["LPUSH", "xapi", "{}"],
]
# What the worker's user keeps (a sample; the full list is roles/xapi_broker defaults).
WORKER_KEEPS = [
    ["BLMOVE", "xapi", "xapi.inflight.node", "RIGHT", "LEFT", "1"],
    ["LRANGE", "xapi.dead_letters", "0", "-1"],
    ["EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "1", "unacked_mutex"],
    ["SCRIPT", "LOAD", "return 1"],
    ["PUBLISH", "/6.celery.pidbox", "x"],
    ["HGET", "unacked", "x"],
    # the last delivery (xapi_worker's scripts.py SET_VALUE; read by check_xapi)
    ["SET", "xapi.last_delivery", "1764633600.5"],
    ["HINCRBY", "xapi.metrics", "delivered", "1"],
    ["HINCRBYFLOAT", "xapi.metrics", "lrs_latency_seconds_sum", "0.5"],
]
DANGEROUS = {
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "script",
    "function",
    "fcall",
    "flushall",
    "flushdb",
    "keys",
    "scan",
    "config",
    "publish",
    "subscribe",
    "psubscribe",
    "lrange",
    "lpop",
    "rpop",
    "brpop",
    "blmove",
    "lmove",
    "del",
    "get",
    "hgetall",
}


def local_redis_version() -> str:
    """The version of the redis-server the dry runs use (7.0.15 on Debian 12)."""
    if not os.path.exists(REDIS_SERVER):
        return "7.0"
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split("v=", 1)[1].split()[0]


def render(out: Path, redis_version: str, overrides: dict | None = None) -> dict:
    """users.acl and the URLs as the roles render them for a Redis of that version."""
    urls = out / "urls.json.j2"
    urls.write_text(URLS)
    files = [
        ROOT / "roles/xapi/defaults/main.yml",
        ROOT / "roles/xapi_broker/defaults/main.yml",
        ROOT / "roles/xapi_broker/vars/main.yml",
        ROOT / "inventories/lab/group_vars/all/xapi.yml",
    ]
    # No inventory: the broker's address, which only the URLs' host part reads, is given;
    # the server's version is what tasks/packages.yml reads from the binary.
    extra = {"xapi_broker_host": "broker.example.org", "xapi_broker_server_version": redis_version}
    templates = {
        str(ROOT / "roles/xapi_broker/templates/users.acl.j2"): "users.acl",
        str(urls): "urls.json",
    }
    result = playbooks.render(out, templates, files, {**extra, **(overrides or {})})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lab = yaml.safe_load((ROOT / "inventories/lab/group_vars/all/xapi.yml").read_text())
    defaults = yaml.safe_load((ROOT / "roles/xapi/defaults/main.yml").read_text())
    return {
        "acl": (out / "localhost-users.acl").read_text(),
        "urls": json.loads((out / "localhost-urls.json").read_text()),
        "lab": lab,
        "defaults": defaults,
        "dir": out,
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return render(tmp_path_factory.mktemp("acl"), local_redis_version())


def user_line(acl: str, name: str) -> list[str]:
    for line in acl.splitlines():
        words = line.split()
        if words[:2] == ["user", name]:
            return words
    pytest.fail(f"no ACL user {name!r} in users.acl:\n{acl}")


def test_producer_and_worker_are_two_users(rendered: dict) -> None:
    producer = rendered["defaults"].get("xapi_broker_producer_user")
    worker = rendered["defaults"]["xapi_broker_user"]
    assert producer and producer != worker
    user_line(rendered["acl"], producer)
    user_line(rendered["acl"], worker)


@pytest.mark.parametrize(
    ("version", "named"), [("7.0.15", False), ("7.2.4", True), ("8.0.2", True)]
)
def test_client_setinfo_only_where_redis_has_it(tmp_path: Path, version: str, named: bool) -> None:
    """redis-py 5 sends CLIENT SETINFO on connect: Redis 7.2+ logs a refusal in ACL LOG
    unless both users may run it (Debian 13's Redis 8.0), and Redis 7.0 (Debian 12) refuses
    an ACL file that names it."""
    acl = render(tmp_path, version)["acl"]
    for user in ("xapi", "xapi-producer"):
        assert ("+client|setinfo" in user_line(acl, user)) is named, version


def test_producer_line_grants_nothing_dangerous(rendered: dict) -> None:
    words = user_line(rendered["acl"], rendered["defaults"]["xapi_broker_producer_user"])
    granted = {w[1:].split("|")[0].lower() for w in words if w.startswith("+")}
    assert granted, words
    assert not granted & DANGEROUS, words
    assert not any(w.startswith("+@") or w in ("allcommands", "allkeys") for w in words)
    # No channel at all, and no key pattern but the queue and its binding.
    assert "resetchannels" in words and not any(w.startswith("&") for w in words)
    keys = {w.split("~", 1)[1] for w in words if "~" in w and not w.startswith("#")}
    assert keys <= {"xapi", "xapi??[0-9]", "_kombu.binding.xapi"}, keys
    # The queue is written, never read but for its length (commands above).
    assert "%W~xapi" in words or "~xapi" in words


def test_urls_name_their_own_user(rendered: dict) -> None:
    producer = rendered["defaults"]["xapi_broker_producer_user"]
    worker = rendered["defaults"]["xapi_broker_user"]
    urls = rendered["urls"]
    assert urls["producer"].startswith(f"redis://{producer}:")
    assert rendered["lab"]["xapi_broker_producer_password"] in urls["producer"]
    assert rendered["lab"]["xapi_broker_password"] not in urls["producer"]
    assert urls["worker"].startswith(f"redis://{worker}:")


# --- the same file in a real Redis ---------------------------------------------------------
def _resp(sock: socket.socket, *args: str) -> str:
    out = b"*%d\r\n" % len(args)
    for a in args:
        data = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    sock.sendall(out)
    f = sock.makefile("rb")
    line = f.readline().rstrip(b"\r\n")
    if line[:1] == b"$":
        size = int(line[1:])
        return f.read(size + 2)[:-2].decode() if size >= 0 else ""
    return line.decode()


@pytest.fixture(scope="module")
def dryrun(rendered: dict) -> Iterator:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("no redis-server here (make system-deps installs it)")
    tmp = tempfile.mkdtemp(prefix="acl-", dir=rendered["dir"])
    path = os.path.join(tmp, "s")
    # The ACL file as rendered, plus an administrator to ask ACL DRYRUN with.
    acl = os.path.join(tmp, "users.acl")
    Path(acl).write_text(
        "\n".join(
            line for line in rendered["acl"].splitlines() if not line.startswith("user default")
        )
        + "\nuser default on nopass ~* &* +@all\n"
    )
    # fmt: off
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
         "--dir", tmp, "--save", "", "--appendonly", "no", "--aclfile", acl],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # fmt: on
    sock = None
    for _ in range(100):
        if server.poll() is not None:
            pytest.fail(f"redis-server refused the rendered users.acl:\n{server.stdout.read()}")
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            break
        except OSError:
            sock = None
            time.sleep(0.05)
    assert sock is not None, "redis-server did not start"

    def ask(user: str, *command: str) -> str:
        return _resp(sock, "ACL", "DRYRUN", user, *command)

    try:
        yield ask
    finally:
        sock.close()
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("command", PRODUCER_NEEDS, ids=lambda c: " ".join(c[:2]))
def test_producer_may_run_what_delay_runs(dryrun, rendered: dict, command: list[str]) -> None:
    assert dryrun(rendered["defaults"]["xapi_broker_producer_user"], *command) == "+OK"


@pytest.mark.parametrize("command", PRODUCER_REFUSED, ids=lambda c: " ".join(c[:2]))
def test_producer_is_refused_the_rest(dryrun, rendered: dict, command: list[str]) -> None:
    answer = dryrun(rendered["defaults"]["xapi_broker_producer_user"], *command)
    assert answer != "+OK" and "no permissions" in answer, answer


@pytest.mark.parametrize("command", WORKER_KEEPS, ids=lambda c: " ".join(c[:2]))
def test_worker_keeps_its_rights(dryrun, rendered: dict, command: list[str]) -> None:
    assert dryrun(rendered["defaults"]["xapi_broker_user"], *command) == "+OK"


# The monitoring check's user (check_xapi, roles/xapi_ops): what the plugin reads, and nothing
# that writes, takes, publishes or runs Lua.
MONITOR_READS = [
    ["PING"],
    ["SELECT", "6"],
    ["LLEN", "xapi"],
    ["LINDEX", "xapi", "-1"],
    ["HLEN", "unacked"],
    ["SMEMBERS", "xapi.inflight"],
    ["LLEN", "xapi.inflight.xapi@enc1"],
    ["EXISTS", "xapi.inflight.xapi@enc1.alive"],
    ["LLEN", "xapi.dead_letters"],
    ["LRANGE", "xapi.dead_letters", "-500", "-1"],
    ["GET", "xapi.last_delivery"],
    ["HGETALL", "xapi.metrics"],
]
MONITOR_REFUSED = [
    ["LPUSH", "xapi", "{}"],
    ["RPOP", "xapi"],
    ["BLMOVE", "xapi", "xapi.inflight.m", "RIGHT", "LEFT", "1"],
    ["DEL", "xapi.dead_letters"],
    ["LREM", "xapi.dead_letters", "0", "x"],
    ["SET", "xapi.last_delivery", "0"],
    ["HINCRBY", "xapi.metrics", "delivered", "1"],
    ["HDEL", "unacked", "x"],
    ["GET", "_kombu.binding.xapi"],
    ["PUBLISH", "/6.celery.pidbox", "x"],
    ["EVAL", "return 1", "0"],
    ["KEYS", "*"],
    ["FLUSHALL"],
    ["CONFIG", "GET", "*"],
]


def monitor_user(rendered: dict) -> str:
    user = rendered["defaults"]["xapi_broker_monitor_user"]
    assert rendered["lab"]["xapi_broker_monitor_password"], "the lab sets the monitoring password"
    user_line(rendered["acl"], user)
    return user


@pytest.mark.parametrize("command", MONITOR_READS, ids=lambda c: " ".join(c[:2]))
def test_monitor_may_read_what_check_xapi_reads(dryrun, rendered: dict, command: list[str]) -> None:
    assert dryrun(monitor_user(rendered), *command) == "+OK"


@pytest.mark.parametrize("command", MONITOR_REFUSED, ids=lambda c: " ".join(c[:2]))
def test_monitor_is_refused_the_rest(dryrun, rendered: dict, command: list[str]) -> None:
    answer = dryrun(monitor_user(rendered), *command)
    assert answer != "+OK" and "no permissions" in answer, answer


def test_no_monitor_user_without_its_password(tmp_path: Path) -> None:
    """An inventory without xapi_broker_monitor_password gets no monitoring user at all."""
    acl = render(tmp_path, "7.0.15", {"xapi_broker_monitor_password": ""})["acl"]
    assert not [line for line in acl.splitlines() if line.startswith("user xapi-monitor ")]
