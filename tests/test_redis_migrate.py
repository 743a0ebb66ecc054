"""The move from Pod's Redis (playbooks/redis-migrate.yml, roles/redis/files/xapi-redis-migrate)
sends no password of the bundle's to whatever listens on Pod's Redis port, and talks to a Redis
on this host only when that Redis is run by the expected user (security review, round two,
finding 1).

Each case runs the playbook against this machine (local connection) with real redis-servers
started here, and a listener of the test's own standing in for a user who took the port: the
test's user is not `redis`, so its listener is what a foothold would bind. The servers the move
may talk to are declared run by the test's user (redis_migrate_from_owner, redis_service_user).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from xapi_testsupport.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
ME = pwd.getpwuid(os.getuid()).pw_name

PASSWORDS = {
    "xapi_broker_password": "workers-password-0123",
    "xapi_broker_producer_password": "producer-password-0123",
    "xapi_broker_monitor_password": "monitor-password-0123",
    "redis_default_password": "admin-password-0123",
    "xapi_lrs_password": "lrs-password-0123",
}
VALUES = {
    **PASSWORDS,
    "xapi_lrs_url": "https://lrs.example.org/xAPI/statements/",
    "xapi_lrs_login": "pod",
    "xapi_broker_tls": False,
    "ansible_become": False,
    # The tool from this checkout, not an installed one.
    "redis_migrator": str(ROOT / "roles/redis/files/xapi-redis-migrate"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of the test's user, without persistence."""

    def __init__(self, workdir: Path, *users: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("redis-server did not start")
        # ACL users as roles/redis writes them ("name rule..."), the last one may lock out
        # the password-less default user.
        for user in users:
            self.cli("ACL", "SETUSER", *user.split())

    def cli(self, *args: str, auth: tuple[str, str] | None = None) -> str:
        login = ["--user", auth[0], "--pass", auth[1], "--no-auth-warning"] if auth else []
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *login, *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Listener:
    """What a local user binds on a Redis port: answers like a Redis that wants a password,
    and accepts (`accept`) or refuses every AUTH; keeps every byte it receives."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.received = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        authed = False
        with conn:
            while data := conn.recv(65536):
                self.received += data
                if b"AUTH" in data.upper():
                    authed = self.accept
                    conn.sendall(b"+OK\r\n" if self.accept else b"-WRONGPASS invalid\r\n")
                elif authed:
                    conn.sendall(b":1\r\n" if b"EXISTS" in data.upper() else b"+OK\r\n")
                else:
                    conn.sendall(b"-NOAUTH Authentication required.\r\n")

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[RedisServer]:
    """The bundle's xAPI instance: its workers' user, as roles/redis makes it."""
    server = RedisServer(
        tmp_path,
        "--user",
        f"xapi on >{PASSWORDS['xapi_broker_password']} ~* +@all",
        "--user",
        "default off",
    )
    yield server
    server.stop()


def migrate(tmp_path: Path, **values: object) -> tuple[int, str]:
    """playbooks/redis-migrate.yml on this machine: exit status and output."""
    inventory = tmp_path / "hosts.yml"
    groups = "".join(
        f"    {group}:\n      hosts:\n        localhost:\n"
        for group in ("pod_frontal", "pod_encodage", "xapi_broker")
    )
    inventory.write_text(
        "all:\n  vars:\n    ansible_connection: local\n"
        "    ansible_python_interpreter: /usr/bin/python3\n  children:\n" + groups
    )
    extra = tmp_path / "vars.yml"
    extra.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**VALUES, **values}.items()))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    result = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            str(inventory),
            "-e",
            f"@{extra}",
            str(ROOT / "playbooks/redis-migrate.yml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def seed(source: RedisServer, count: int) -> list[str]:
    """Statements as a seed-style site leaves them in db 6: queued, and one taken (unacked)."""
    ids = [f"seed-{n}" for n in range(count)]
    messages = [json.dumps({"body": "e30=", "headers": {"id": i}}) for i in ids]
    source.cli("-n", "6", "LPUSH", "xapi", *messages[1:])
    source.cli(
        "-n", "6", "HSET", "unacked", "tag-0", json.dumps([json.loads(messages[0]), "", "xapi"])
    )
    return ids


@pytest.mark.parametrize("accept", [True, False], ids=["accepts-auth", "refuses-auth"])
def test_a_listener_on_pod_redis_port_gets_no_password(
    tmp_path: Path, instance: RedisServer, accept: bool
) -> None:
    """A user who bound Pod's Redis port (Pod's Redis down, or shut down by that user) receives
    none of the bundle's passwords, and the run says so and fails."""
    listener = Listener(accept)
    try:
        returncode, output = migrate(
            tmp_path,
            redis_migrate_from_port=listener.port,
            xapi_broker_port=instance.port,
            redis_service_user=ME,
        )
    finally:
        listener.close()
    received = bytes(listener.received)
    for name, password in PASSWORDS.items():
        assert password.encode() not in received, f"{name} sent to the listener: {received!r}"
    assert received == b"", f"the impostor was sent {received!r}"
    assert returncode != 0, output[-3000:]
    assert "is not a redis-server run by redis" in output, output[-3000:]


def test_an_impostor_instance_gets_no_password(tmp_path: Path) -> None:
    """Statements wait in Pod's Redis, and a user took the instance's port: the workers'
    password is not sent there, and the statements stay where they are."""
    source = RedisServer(tmp_path)
    listener = Listener(accept=True)
    try:
        seed(source, 3)
        returncode, output = migrate(
            tmp_path,
            redis_migrate_from_port=source.port,
            redis_migrate_from_owner=ME,
            xapi_broker_port=listener.port,
        )
        assert source.cli("-n", "6", "LLEN", "xapi") == "2"
    finally:
        listener.close()
        source.stop()
    assert PASSWORDS["xapi_broker_password"].encode() not in listener.received
    assert returncode != 0, output[-3000:]


def test_statements_move_once_from_a_password_less_pod_redis(
    tmp_path: Path, instance: RedisServer
) -> None:
    source = RedisServer(tmp_path)
    try:
        seed(source, 5)
        common = {
            "redis_migrate_from_port": source.port,
            "redis_migrate_from_owner": ME,
            "xapi_broker_port": instance.port,
            "redis_service_user": ME,
        }
        returncode, output = migrate(tmp_path, **common)
        assert returncode == 0, output[-3000:]
        assert "Moved 5 statements" in output, output[-3000:]
        assert "changed=1" in output
        again, output = migrate(tmp_path, **common)
        assert again == 0, output[-3000:]
        assert "changed=0" in output
        assert source.cli("-n", "6", "DBSIZE") == "0"
    finally:
        source.stop()
    auth = ("xapi", PASSWORDS["xapi_broker_password"])
    assert instance.cli("-n", "6", "LLEN", "xapi", auth=auth) == "5"
    assert instance.cli("-n", "6", "SCARD", "xapi.migrated", auth=auth) == "1"


def test_the_operators_own_login_is_used_for_pod_redis(
    tmp_path: Path, instance: RedisServer
) -> None:
    """A Pod's Redis with a password: the move logs in with the login the operator gave for it
    alone (redis_migrate_from_user/password), and that login only."""
    source = RedisServer(tmp_path, "--user", "mover on >mover-password-0123 ~* +@all")
    try:
        seed(source, 2)
        returncode, output = migrate(
            tmp_path,
            redis_migrate_from_port=source.port,
            redis_migrate_from_owner=ME,
            redis_migrate_from_user="mover",
            redis_migrate_from_password="mover-password-0123",
            xapi_broker_port=instance.port,
            redis_service_user=ME,
        )
        assert returncode == 0, output[-3000:]
        assert "Moved 2 statements" in output, output[-3000:]
    finally:
        source.stop()


def test_a_local_peer_missing_from_the_kernels_tables_is_no_other_host(monkeypatch) -> None:
    """The kernel's /proc/net/tcp is read in pieces: a local peer's line missed there used to
    count as "another host", and the workers' password went out unchecked."""
    tool = load_script("xapi_redis_migrate", ROOT / "roles/redis/files/xapi-redis-migrate")
    monkeypatch.setattr(tool, "_peer_socket", lambda sock: None)
    monkeypatch.setattr(tool, "ACCEPT_WAIT", 0.1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname()) as sock:
            with pytest.raises(tool.Impostor, match="not in this host's tables"):
                tool.check_peer(sock, ME)
