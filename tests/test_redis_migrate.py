"""The move from Pod's Redis (playbooks/redis-migrate.yml,
roles/xapi_broker/files/xapi-redis-migrate) sends no password of the bundle's to whatever
listens on Pod's Redis port, and talks to a Redis on this host only when that Redis is run by
the expected user in the expected systemd service (security review, round two, finding 1, and
the review of what landed for it).

Each case runs the playbook against this machine (local connection) with real redis-servers
started here, and a listener of the test's own standing in for a user who took the port: the
test's user is not `redis`, so its listener is what a foothold would bind. The servers the move
may talk to are declared run by the test's user (xapi_broker_migrate_from_owner,
xapi_broker_service_user), and are started in cgroups named as systemd names its services' (a
slice of the test's own, then redis-server.service for Pod's Redis, redis-server@xapi.service
for the instance), in the hierarchy the tool reads: making them needs root.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
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
# The services of roles/xapi_broker: Pod's Redis (xapi_broker_migrate_from_unit), the instance
# (xapi_broker_unit).
POD_UNIT = "redis-server.service"
INSTANCE_UNIT = "redis-server@xapi.service"

PASSWORDS = {
    "xapi_broker_password": "workers-password-0123",
    "xapi_broker_producer_password": "producer-password-0123",
    "xapi_broker_monitor_password": "monitor-password-0123",
    "xapi_broker_admin_password": "admin-password-0123",
    "xapi_lrs_password": "lrs-password-0123",
}
VALUES = {
    **PASSWORDS,
    "xapi_lrs_url": "https://lrs.example.org/xAPI/statements/",
    "xapi_lrs_login": "pod",
    "xapi_broker_tls": False,
    "ansible_become": False,
    # The tool from this checkout, not an installed one.
    "xapi_broker_migrator": str(ROOT / "roles/xapi_broker/files/xapi-redis-migrate"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def systemd_hierarchy() -> Path:
    """Where the cgroup hierarchy the tool reads is mounted: systemd's own (name=systemd)
    where there is one, else the unified one; the mount that holds this process's cgroup."""
    mine = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        mine[controllers or number] = path
    named = "name=systemd" in mine
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
        if (named and fstype == "cgroup" and "name=systemd" in options) or (
            not named and fstype == "cgroup2"
        ):
            return Path(fields[4])
    raise AssertionError("no cgroup hierarchy of systemd's mounted here")


class Cgroups:
    """Cgroups of a slice of the test's own, in the hierarchy the tool reads; removed at the
    end (their processes stopped first)."""

    def __init__(self) -> None:
        self.slice = systemd_hierarchy() / f"xapi-test-{secrets.token_hex(4)}.slice"
        self.made: list[Path] = []

    def make(self, relative: str) -> Path:
        path = self.slice / relative
        for part in [*reversed(path.relative_to(self.slice.parent).parents), path]:
            full = self.slice.parent / part
            if part != Path(".") and not full.exists():
                full.mkdir()
                self.made.append(full)
        return path

    def remove(self) -> None:
        for path in reversed(self.made):
            path.rmdir()


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    if os.getuid() != 0:
        pytest.skip("needs root (makes cgroups)")
    made = Cgroups()
    yield made
    made.remove()


class RedisServer:
    """A redis-server of the test's user, without persistence; started in ``cgroup`` when
    given (it moves itself there before it runs redis-server)."""

    def __init__(self, workdir: Path, *users: str, cgroup: Path | None = None) -> None:
        workdir.mkdir(exist_ok=True)
        self.port = free_port()
        enter = (
            ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$0" "$@"'] if cgroup else []
        )
        self.proc = subprocess.Popen(
            [
                *enter,
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
        # ACL users as roles/xapi_broker writes them ("name rule..."), the last one may lock out
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

    def raw(self, db: int, *args: bytes) -> bytes | None:
        """One command on database ``db``, its arguments sent as they are (any bytes): its
        reply, a bulk string's content or the reply's line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            replies = sock.makefile("rb")
            for command in ([b"SELECT", str(db).encode()], args):
                sock.sendall(
                    b"*%d\r\n" % len(command)
                    + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in command)
                )
                line = replies.readline()
            if line.startswith(b"$"):
                size = int(line[1:])
                return None if size < 0 else replies.read(size + 2)[:size]
            return line.rstrip(b"\r\n")

    def commands(self, auth: tuple[str, str] | None = None) -> dict[str, int]:
        """How many times this server was sent each command (INFO commandstats), but INFO
        (the test's own, to read them)."""
        calls = {}
        for line in self.cli("INFO", "commandstats", auth=auth).splitlines():
            if line.startswith("cmdstat_"):
                name, stats = line.removeprefix("cmdstat_").split(":", 1)
                calls[name] = int(stats.split(",")[0].removeprefix("calls="))
        calls.pop("info", None)
        return calls

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


def start_instance(tmp_path: Path, cgroup: Path | None) -> RedisServer:
    """The bundle's xAPI instance: its workers' user, as roles/xapi_broker makes it."""
    return RedisServer(
        tmp_path,
        "--user",
        f"xapi on >{PASSWORDS['xapi_broker_password']} ~* +@all",
        "--user",
        "default off",
        cgroup=cgroup,
    )


@pytest.fixture
def instance(tmp_path: Path, cgroups: Cgroups) -> Iterator[RedisServer]:
    """The instance in its service's cgroup."""
    server = start_instance(tmp_path, cgroups.make(f"system-redis.slice/{INSTANCE_UNIT}"))
    yield server
    server.stop()


@pytest.fixture
def pod_redis(tmp_path: Path, cgroups: Cgroups) -> Iterator[RedisServer]:
    """Pod's Redis, password-less as Pod's docs leave it, in its service's cgroup."""
    server = RedisServer(tmp_path / "pod", cgroup=cgroups.make(POD_UNIT))
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
            xapi_broker_migrate_from_port=listener.port,
            xapi_broker_port=instance.port,
            xapi_broker_service_user=ME,
        )
    finally:
        listener.close()
    received = bytes(listener.received)
    for name, password in PASSWORDS.items():
        assert password.encode() not in received, f"{name} sent to the listener: {received!r}"
    assert received == b"", f"the impostor was sent {received!r}"
    assert returncode != 0, output[-3000:]
    assert "is not a redis-server run by redis" in output, output[-3000:]


def test_an_impostor_instance_gets_no_password(tmp_path: Path, pod_redis: RedisServer) -> None:
    """Statements wait in Pod's Redis, and a user took the instance's port: the workers'
    password is not sent there, and the statements stay where they are."""
    listener = Listener(accept=True)
    try:
        seed(pod_redis, 3)
        returncode, output = migrate(
            tmp_path,
            xapi_broker_migrate_from_port=pod_redis.port,
            xapi_broker_migrate_from_owner=ME,
            xapi_broker_port=listener.port,
        )
        assert pod_redis.cli("-n", "6", "LLEN", "xapi") == "2"
    finally:
        listener.close()
    assert PASSWORDS["xapi_broker_password"].encode() not in listener.received
    assert returncode != 0, output[-3000:]


def test_statements_move_once_from_a_password_less_pod_redis(
    tmp_path: Path, instance: RedisServer, pod_redis: RedisServer
) -> None:
    seed(pod_redis, 5)
    common = {
        "xapi_broker_migrate_from_port": pod_redis.port,
        "xapi_broker_migrate_from_owner": ME,
        "xapi_broker_port": instance.port,
        "xapi_broker_service_user": ME,
    }
    returncode, output = migrate(tmp_path, **common)
    assert returncode == 0, output[-3000:]
    assert "Moved 5 statements" in output, output[-3000:]
    assert "changed=1" in output
    again, output = migrate(tmp_path, **common)
    assert again == 0, output[-3000:]
    assert "changed=0" in output
    assert pod_redis.cli("-n", "6", "DBSIZE") == "0"
    auth = ("xapi", PASSWORDS["xapi_broker_password"])
    assert instance.cli("-n", "6", "LLEN", "xapi", auth=auth) == "5"
    assert instance.cli("-n", "6", "SCARD", "xapi.migrated", auth=auth) == "1"


def test_the_operators_own_login_is_used_for_pod_redis(
    tmp_path: Path, instance: RedisServer, cgroups: Cgroups
) -> None:
    """A Pod's Redis with a password: the move logs in with the login the operator gave for it
    alone (xapi_broker_migrate_from_user/password), and that login only."""
    source = RedisServer(
        tmp_path / "pod",
        "--user",
        "mover on >mover-password-0123 ~* +@all",
        cgroup=cgroups.make(POD_UNIT),
    )
    try:
        seed(source, 2)
        returncode, output = migrate(
            tmp_path,
            xapi_broker_migrate_from_port=source.port,
            xapi_broker_migrate_from_owner=ME,
            xapi_broker_migrate_from_user="mover",
            xapi_broker_migrate_from_password="mover-password-0123",
            xapi_broker_port=instance.port,
            xapi_broker_service_user=ME,
        )
        assert returncode == 0, output[-3000:]
        assert "Moved 2 statements" in output, output[-3000:]
    finally:
        source.stop()


def test_a_local_peer_missing_from_the_kernels_tables_is_no_other_host(monkeypatch) -> None:
    """The kernel's /proc/net/tcp is read in pieces: a local peer's line missed there used to
    count as "another host", and the workers' password went out unchecked."""
    tool = load_script("xapi_redis_migrate", ROOT / "roles/xapi_broker/files/xapi-redis-migrate")
    monkeypatch.setattr(tool, "_peer_socket", lambda sock: None)
    monkeypatch.setattr(tool, "ACCEPT_WAIT", 0.1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname()) as sock:
            with pytest.raises(tool.Impostor, match="not in this host's tables"):
                tool.check_peer(sock, ME, POD_UNIT)


# The review of what landed for finding 1: "a redis-server run by redis" is not yet Pod's
# Redis. Any other redis-server of that user passed: the xAPI instance itself, one started in
# no service, or in a user's own systemd manager (which may name its cgroups as it likes).
@pytest.mark.parametrize(
    "where",
    ["the-instance-itself", "no-service", "a-user-manager"],
)
def test_another_redis_server_of_pods_redis_user_gets_nothing(
    tmp_path: Path, instance: RedisServer, cgroups: Cgroups, where: str
) -> None:
    """On Pod's Redis port, a password-less redis-server of the user Pod's Redis runs as,
    holding a seed's statements, but outside Pod's service (xapi_broker_migrate_from_unit): it is
    sent no command, nothing moves, and the run fails naming the variables."""
    if where == "the-instance-itself":
        other = instance
    else:
        manager = "user.slice/user-1000.slice/user@1000.service/app.slice/"
        cgroup = cgroups.make(manager + POD_UNIT) if where == "a-user-manager" else None
        other = RedisServer(tmp_path / "other", cgroup=cgroup)
        seed(other, 3)
    auth = ("xapi", PASSWORDS["xapi_broker_password"]) if other is instance else None
    try:
        before = other.commands(auth)
        returncode, output = migrate(
            tmp_path,
            xapi_broker_migrate_from_port=other.port,
            xapi_broker_migrate_from_owner=ME,
            xapi_broker_port=instance.port,
            xapi_broker_service_user=ME,
        )
        after = other.commands(auth)
        if auth:  # the test's own login, to read them again
            after["auth"] -= 1
        if other is not instance:
            assert other.cli("-n", "6", "LLEN", "xapi") == "2"
            assert other.cli("-n", "6", "HLEN", "unacked") == "1"
    finally:
        if other is not instance:
            other.stop()
    assert after == before, f"the move sent commands: {before} -> {after}"
    assert returncode != 0, output[-3000:]
    assert f"not the service {POD_UNIT}" in output, output[-3000:]
    assert "xapi_broker_migrate_from_unit" in output, output[-3000:]


def test_an_instance_outside_its_service_gets_no_password(
    tmp_path: Path, pod_redis: RedisServer, cgroups: Cgroups
) -> None:
    """On the instance's port, a redis-server of the instance's user in another service (Pod's
    Redis' own unit name, in another slice): the workers' password is not sent there, and the
    statements stay in Pod's Redis."""
    target = start_instance(tmp_path / "instance", cgroups.make(f"other.slice/{POD_UNIT}"))
    auth = ("xapi", PASSWORDS["xapi_broker_password"])
    try:
        seed(pod_redis, 3)
        returncode, output = migrate(
            tmp_path,
            xapi_broker_migrate_from_port=pod_redis.port,
            xapi_broker_migrate_from_owner=ME,
            xapi_broker_port=target.port,
            xapi_broker_service_user=ME,
        )
        sent = target.commands(auth)
    finally:
        target.stop()
    # The instance saw only the test's own commands: its users, its one login to read them.
    assert set(sent) == {"acl|setuser", "auth"} and sent["auth"] == 1, sent
    assert returncode != 0, output[-3000:]
    assert f"not the service {INSTANCE_UNIT}" in output, output[-3000:]
    assert pod_redis.cli("-n", "6", "LLEN", "xapi") == "2"


# One entry that is not a message, planted in Pod's Redis by anyone who can write there, made
# every run fail (a traceback, the statements held under their token): now it is left where
# it was, named, and the others move, once.
UNREADABLE = {
    b"not-json": b"{oops",
    b"no-message": b'[1, "", "xapi"]',
    b"an-object": b'{"body": "e30="}',
    b"empty": b"[]",
    b"deep": b"[" * 100_000 + b"]" * 100_000,
    b"not-utf8": b'[{"body": "\xff\xfe"}, "", "xapi"]',
    b"tag-\x1b[31m-red": b"\x00",
}


def test_entries_that_are_not_messages_are_left_and_the_rest_moves_once(
    tmp_path: Path, instance: RedisServer, pod_redis: RedisServer
) -> None:
    ids = seed(pod_redis, 5)
    for tag, entry in UNREADABLE.items():
        assert pod_redis.raw(6, b"HSET", b"unacked", tag, entry) == b":1"
    # Keys of the move's names but of another type: not the move's, left as they are.
    planted_queue = b"xapi\x06\x163"
    planted_token = b"xapi.migrating." + b"0" * 32 + b".2"
    for key in (planted_queue, planted_token):
        assert pod_redis.raw(6, b"SET", key, b"planted") == b"+OK"
    common = {
        "xapi_broker_migrate_from_port": pod_redis.port,
        "xapi_broker_migrate_from_owner": ME,
        "xapi_broker_port": instance.port,
        "xapi_broker_service_user": ME,
    }
    auth = ("xapi", PASSWORDS["xapi_broker_password"])
    for run in ("first", "again"):
        returncode, output = migrate(tmp_path, **common)
        assert returncode == 0, output[-3000:]
        output = " ".join(output.split())  # the report's lines as one
        moved = 5 if run == "first" else 0
        assert f"Moved {moved} statements" in output, output[-3000:]
        assert f"changed={1 if run == 'first' else 0}" in output, output[-3000:]
        left = (
            "Left there as they were, since they are not messages of the queue xapi: "
            f"{len(UNREADABLE) + 2}"
        )
        assert left in output, output[-3000:]
        for name in ("unacked not-json", "unacked deep", "unacked tag-\\x1b[31m-red"):
            assert name in output, output[-3000:]
        assert "(a string, not a list)" in output, output[-3000:]
        assert "\x1b" not in output, "a planted name reached the terminal as it is"
        # Every statement once in the instance, one move recorded.
        queued = instance.cli("-n", "6", "LRANGE", "xapi", "0", "-1", auth=auth).splitlines()
        assert sorted(json.loads(m)["headers"]["id"] for m in queued) == sorted(ids)
        assert instance.cli("-n", "6", "SCARD", "xapi.migrated", auth=auth) == "1"
        # What is not a message is where it was, as it was; nothing else is left.
        assert pod_redis.raw(6, b"HLEN", b"unacked") == b":%d" % len(UNREADABLE)
        for tag, entry in UNREADABLE.items():
            assert pod_redis.raw(6, b"HGET", b"unacked", tag) == entry
        for key in (planted_queue, planted_token):
            assert pod_redis.raw(6, b"GET", key) == b"planted"
        assert pod_redis.cli("-n", "6", "DBSIZE") == "3"


def run_tool(pod_redis: RedisServer, instance: RedisServer) -> dict:
    """xapi-redis-migrate itself (what tasks/migrate.yml runs), as the playbook calls it: its
    report."""
    cfg = {
        "source": {
            "host": "127.0.0.1",
            "port": pod_redis.port,
            "db": 6,
            "user": "",
            "password": "",
            "owner": ME,
            "unit": POD_UNIT,
        },
        "target": {
            "host": "127.0.0.1",
            "port": instance.port,
            "db": 6,
            "user": "xapi",
            "password": PASSWORDS["xapi_broker_password"],
            "tls": False,
            "ca_file": "",
            "owner": ME,
            "unit": INSTANCE_UNIT,
        },
        "timeout": 10,
    }
    result = subprocess.run(
        [VALUES["xapi_broker_migrator"]],
        input=json.dumps(cfg),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_one_mover_at_a_time(instance: RedisServer, pod_redis: RedisServer) -> None:
    """Review L5: several broker hosts may read one Pod's Redis (each frontal's instance). A run
    that finds the move's lock taken in Pod's Redis (another host's run) moves nothing and says
    so; the lock gone, the next run moves; its own lock is gone when it ends."""
    seed(pod_redis, 3)
    assert pod_redis.cli("-n", "6", "SET", "xapi.migrating.lock", "other", "PX", "60000") == "OK"
    report = run_tool(pod_redis, instance)
    assert (report["state"], report["moved"]) == ("busy", 0), report
    assert "xapi.migrating.lock" in report["detail"]
    assert pod_redis.cli("-n", "6", "LLEN", "xapi") == "2"
    assert pod_redis.cli("-n", "6", "HLEN", "unacked") == "1"
    auth = ("xapi", PASSWORDS["xapi_broker_password"])
    assert instance.cli("-n", "6", "EXISTS", "xapi", auth=auth) == "0"
    # The other run's lock is its own: not taken over, not released.
    assert pod_redis.cli("-n", "6", "GET", "xapi.migrating.lock") == "other"
    pod_redis.cli("-n", "6", "DEL", "xapi.migrating.lock")
    report = run_tool(pod_redis, instance)
    assert (report["state"], report["moved"]) == ("moved", 3), report
    assert pod_redis.cli("-n", "6", "EXISTS", "xapi.migrating.lock") == "0"
    assert pod_redis.cli("-n", "6", "DBSIZE") == "0"


def test_only_xapis_entries_and_binding_move(instance: RedisServer, pod_redis: RedisServer) -> None:
    """Review L6: a database Pod's own Celery also uses (a typo of 5, a seed site that put both
    on one): its `unacked` entries of another queue, their `unacked_index` entries and its
    bindings stay as they were; only xAPI's entries, their index entries and xAPI's binding
    go."""
    ids = seed(pod_redis, 3)
    encode = json.dumps([{"body": "e30=", "headers": {"id": "encode-1"}}, "", "celery"])
    pod_redis.cli("-n", "6", "HSET", "unacked", "tag-pod", encode)
    pod_redis.cli("-n", "6", "ZADD", "unacked_index", "100", "tag-0", "200", "tag-pod")
    pod_redis.cli("-n", "6", "SET", "unacked_mutex", "pods-restore")
    for exchange in ("xapi", "celery"):
        pod_redis.cli("-n", "6", "SADD", f"_kombu.binding.{exchange}", f"{exchange}\x06\x16")
    report = run_tool(pod_redis, instance)
    assert (report["state"], report["moved"]) == ("moved", 3), report
    assert report["left_names"] == ["unacked tag-pod (for the queue celery, not xapi)"], report
    auth = ("xapi", PASSWORDS["xapi_broker_password"])
    queued = instance.cli("-n", "6", "LRANGE", "xapi", "0", "-1", auth=auth).splitlines()
    assert sorted(json.loads(m)["headers"]["id"] for m in queued) == sorted(ids)
    assert pod_redis.cli("-n", "6", "HGETALL", "unacked").splitlines() == ["tag-pod", encode]
    assert pod_redis.cli("-n", "6", "ZRANGE", "unacked_index", "0", "-1") == "tag-pod"
    assert pod_redis.cli("-n", "6", "GET", "unacked_mutex") == "pods-restore"
    assert pod_redis.cli("-n", "6", "EXISTS", "_kombu.binding.celery") == "1"
    assert pod_redis.cli("-n", "6", "EXISTS", "_kombu.binding.xapi") == "0"
    # Pod's entry is named again by the next run, and still not moved.
    again = run_tool(pod_redis, instance)
    assert (again["moved"], again["left"]) == (0, 1), again
    assert pod_redis.cli("-n", "6", "HLEN", "unacked") == "1"
