"""roles/xapi_broker: the broker is an instance of its own on `frontal` (redis-server@xapi, beside
Pod's redis-server); the encoding host can use it, nobody else can.

Clients speak RESP over a plain Python socket on the hosts themselves (no redis-tools on
the clients). Passwords come from the lab's group_vars, the broker's port/db/user from the
shared xapi role's defaults: nothing is restated here.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
import yaml
from xapi_testsupport.broker import PRODUCER_REFUSED
from xapi_testsupport.pod_on_host import delivered, produce

ROOT = Path(__file__).resolve().parents[3]
UNIT = "redis-server@xapi"
DURABILITY_KEY = "redis-test:durability"
# Objects the denial test below provokes on purpose (they show up in ACL LOG).
PROVOKED_DENIALS = {"keys", "config|get", "flushall", "redis-test:not-a-queue", "not-a-channel"}

# A minimal RESP client run on the host: argv = host port json(commands); prints the replies
# ("+OK", "-ERR ...", integers, strings, lists) or the connection error.
RESP_CLIENT = r"""
import json, socket, sys
host, port, cmds = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
def enc(args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out
try:
    s = socket.create_connection((host, port), timeout=3)
except OSError as e:
    print(json.dumps({"connect_error": type(e).__name__}))
    sys.exit(0)
f = s.makefile("rb")
def read():
    line = f.readline().rstrip(b"\r\n")
    t, rest = line[:1], line[1:].decode()
    if t in (b"+", b"-"):
        return t.decode() + rest
    if t == b":":
        return int(rest)
    if t == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode("utf-8", "replace")
    if t == b"*":
        n = int(rest)
        return None if n < 0 else [read() for _ in range(n)]
    raise ValueError(line)
replies = []
for c in cmds:
    s.sendall(enc(c))
    replies.append(read())
print(json.dumps({"replies": replies}))
"""


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.fixture(scope="module")
def settings() -> dict:
    """Broker settings as the roles see them: xapi defaults, then the lab's group_vars."""
    merged = _yaml(ROOT / "roles/xapi/defaults/main.yml")
    merged.update(_yaml(ROOT / "inventories/lab/group_vars/all/xapi.yml"))
    return merged


@pytest.fixture(scope="module")
def broker_ip(frontal) -> str:
    return frontal.check_output("hostname -I").split()[0]


def resp(host, target: str, port: int, *commands: list) -> dict:
    cmd = " ".join(
        shlex.quote(a)
        for a in ("python3", "-c", RESP_CLIENT, target, str(port), json.dumps(commands))
    )
    return json.loads(host.check_output(cmd))


def as_xapi(settings: dict, *commands: list) -> list:
    return [
        ["AUTH", settings["xapi_broker_user"], settings["xapi_broker_password"]],
        ["SELECT", settings["xapi_broker_db"]],
        *commands,
    ]


def as_producer(settings: dict, *commands: list) -> list:
    """Pod's producer's credentials: what a compromised web application on the frontal holds."""
    return [
        ["AUTH", settings["xapi_broker_producer_user"], settings["xapi_broker_producer_password"]],
        ["SELECT", settings["xapi_broker_db"]],
        *commands,
    ]


def as_admin(settings: dict, *commands: list) -> list:
    return [["AUTH", "default", settings["xapi_broker_admin_password"]], *commands]


def wait_ready(frontal, settings: dict) -> None:
    for _ in range(60):
        out = resp(
            frontal, "127.0.0.1", settings["xapi_broker_port"], *as_admin(settings, ["PING"])
        )
        if out.get("replies", [None, None])[-1] == "+PONG":
            return
        time.sleep(0.5)
    pytest.fail("Redis did not come back")


def test_debian_template_unit_enabled_and_kept(frontal):
    service = frontal.service(UNIT)
    assert service.is_enabled and service.is_running
    shown = frontal.check_output(
        f"systemctl show -p FragmentPath -p DropInPaths -p ProtectSystem -p User {UNIT}"
    )
    props = dict(line.split("=", 1) for line in shown.splitlines())
    assert props["FragmentPath"].endswith("/lib/systemd/system/redis-server@.service")
    assert props["DropInPaths"] == ""
    assert props["ProtectSystem"] == "strict" and props["User"] == "redis"


@pytest.mark.parametrize("path", ["/etc/redis/redis-xapi.conf", "/etc/redis/redis-xapi.acl"])
def test_config_files_root_owned_not_world_readable(frontal, path):
    """Redis reads them (group) and cannot rewrite its own users or configuration."""
    f = frontal.file(path)
    assert f.user == "root" and f.group == "redis" and f.mode == 0o640


def test_data_directory_of_its_own(frontal):
    d = frontal.file("/var/lib/redis/xapi")
    assert d.is_directory and d.user == "redis" and d.mode == 0o750
    assert frontal.file("/var/lib/redis/xapi/appendonlydir").is_directory


def _secrets(settings: dict) -> tuple[str, ...]:
    return (
        settings["xapi_broker_password"],
        settings["xapi_broker_producer_password"],
        settings["xapi_broker_admin_password"],
    )


def test_acl_file_holds_only_password_hashes(frontal, settings):
    acl = frontal.file("/etc/redis/redis-xapi.acl").content_string
    assert f"user {settings['xapi_broker_user']} " in acl
    assert f"user {settings['xapi_broker_producer_user']} " in acl
    for secret in _secrets(settings):
        assert secret not in acl


def test_no_password_in_the_frontal_journal_or_processes(frontal, settings):
    """The role's own checks pass passwords on stdin: an Ansible `environment:` value
    would land on sudo's command line, hence in `ps` and in the journal."""
    for secret in _secrets(settings):
        assert frontal.run("journalctl --no-pager | grep -cF -- %s", secret).stdout.strip() == "0"
        assert (
            frontal.run("ps -eo args | grep -v grep | grep -cF -- %s", secret).stdout.strip() == "0"
        )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("protected-mode", "yes"),
        ("maxmemory-policy", "noeviction"),
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("aclfile", "/etc/redis/redis-xapi.acl"),
        ("dir", "/var/lib/redis/xapi"),
    ],
)
def test_runtime_setting(frontal, settings, name, expected):
    out = resp(
        frontal,
        "127.0.0.1",
        settings["xapi_broker_port"],
        *as_admin(settings, ["CONFIG", "GET", name]),
    )
    assert out["replies"] == ["+OK", [name, expected]]


def test_maxmemory_is_set(frontal, settings):
    out = resp(
        frontal,
        "127.0.0.1",
        settings["xapi_broker_port"],
        *as_admin(settings, ["CONFIG", "GET", "maxmemory"]),
    )
    assert int(out["replies"][1][1]) > 0


def test_client_without_credentials_is_refused(encodage, settings, broker_ip):
    out = resp(encodage, broker_ip, settings["xapi_broker_port"], ["PING"], ["LLEN", "xapi"])
    assert all(r.startswith("-NOAUTH") for r in out["replies"])


def test_wrong_password_is_refused(encodage, settings, broker_ip):
    out = resp(
        encodage,
        broker_ip,
        settings["xapi_broker_port"],
        ["AUTH", settings["xapi_broker_user"], "not-the-password"],
    )
    assert out["replies"][0].startswith("-WRONGPASS")


def test_xapi_user_works_from_encodage(encodage, settings, broker_ip):
    out = resp(
        encodage,
        broker_ip,
        settings["xapi_broker_port"],
        *as_xapi(settings, ["PING"], ["LLEN", "xapi"]),
    )
    assert out["replies"][:3] == ["+OK", "+OK", "+PONG"]
    assert isinstance(out["replies"][3], int)


def test_pod_producer_reaches_its_own_instance_over_loopback(frontal, settings):
    """Pod's producer on the frontal does not cross the network: settings_local.py names the
    loopback address of the frontal's own instance, with the producer's own user."""
    text = frontal.file(
        "/usr/local/django_projects/podv4/pod/custom/settings_local.py"
    ).content_string
    line = next(x for x in text.splitlines() if x.startswith("XAPI_CELERY_BROKER_URL"))
    assert f"@127.0.0.1:{settings['xapi_broker_port']}/" in line
    out = resp(frontal, "127.0.0.1", settings["xapi_broker_port"], *as_producer(settings, ["PING"]))
    assert out["replies"] == ["+OK", "+OK", "+PONG"]


def test_frontal_holds_only_the_producers_credentials(frontal, settings):
    """Security review point 4: the web app's settings name the producer, never the worker's
    user or password."""
    text = frontal.file(
        "/usr/local/django_projects/podv4/pod/custom/settings_local.py"
    ).content_string
    line = next(x for x in text.splitlines() if x.startswith("XAPI_CELERY_BROKER_URL"))
    assert f"//{settings['xapi_broker_producer_user']}:" in line
    assert settings["xapi_broker_password"] not in text
    assert f"//{settings['xapi_broker_user']}:" not in text


def test_no_acl_denial_of_the_producer_after_the_pipeline(frontal, settings):
    """After converge and the pipeline tests (Pod's .delay(), check.yml, the frontal's
    preflight and client check, all with the producer's credentials), ACL LOG holds no
    denial of the producer: its few commands are all Pod needs. Runs before the refusals
    below provoke some; failed logins (reason "auth") are the wrong-password test's."""
    out = resp(
        frontal,
        "127.0.0.1",
        settings["xapi_broker_port"],
        *as_admin(settings, ["ACL", "LOG", "128"]),
    )
    entries = [dict(zip(e[::2], e[1::2], strict=True)) for e in out["replies"][1]]
    denied = [
        (e["reason"], e["object"])
        for e in entries
        if e["username"] == settings["xapi_broker_producer_user"] and e["reason"] != "auth"
    ]
    assert denied == []


@pytest.mark.parametrize("command", PRODUCER_REFUSED, ids=lambda c: " ".join(c[:2]))
def test_producer_is_refused_everything_else(frontal, settings, command):
    # Each command alone after its AUTH/SELECT: a SUBSCRIBE that were accepted would turn
    # the connection into a subscriber and the next reply would not be the next command's.
    out = resp(frontal, "127.0.0.1", settings["xapi_broker_port"], *as_producer(settings, command))
    assert out["replies"][:2] == ["+OK", "+OK"], out
    assert out["replies"][2].startswith("-NOPERM"), out


def test_producer_can_still_queue(frontal, settings):
    """Pod's own .delay(), with the settings the role wrote (the producer's user), still
    queues, and the statement is delivered (taken by the worker)."""
    assert delivered(frontal, produce(frontal)), "queued with the producer's user, never delivered"


def test_xapi_user_gets_nothing_beyond_the_queue(encodage, settings, broker_ip):
    out = resp(
        encodage,
        broker_ip,
        settings["xapi_broker_port"],
        *as_xapi(
            settings,
            ["KEYS", "*"],
            ["CONFIG", "GET", "maxmemory"],
            ["FLUSHALL"],
            ["LPUSH", "redis-test:not-a-queue", "x"],
            ["PUBLISH", "not-a-channel", "x"],
        ),
    )
    assert all(r.startswith("-NOPERM") for r in out["replies"][2:]), out


def test_lrs_cannot_reach_redis(frontal, lrs, settings, broker_ip):
    counter = "nft -j list chain inet xapi_redis redis_clients"

    def dropped() -> int:
        rules = json.loads(frontal.check_output(counter))["nftables"]
        return sum(
            r["rule"]["expr"][0]["counter"]["packets"]
            for r in rules
            if "rule" in r and "counter" in r["rule"]["expr"][0]
        )

    before = dropped()
    out = resp(lrs, broker_ip, settings["xapi_broker_port"], ["PING"])
    assert out.get("connect_error") in ("TimeoutError", "timeout", "ConnectionRefusedError"), out
    assert dropped() > before


def test_firewall_is_its_own_table_loaded_by_its_unit(frontal):
    assert frontal.service("xapi-redis-firewall").is_enabled
    tables = frontal.check_output("nft list tables")
    assert "table inet xapi_redis" in tables
    after = frontal.check_output("systemctl show -p After xapi-redis-firewall")
    assert "nftables.service" in after


def test_no_unexpected_acl_denial_of_the_xapi_user(frontal, settings):
    """Whatever ran against the broker so far (Celery, tests), the xAPI user was never refused
    a command, key or channel other than the ones provoked on purpose above. (Failed logins,
    reason "auth", are provoked by the wrong-password test.)"""
    out = resp(
        frontal,
        "127.0.0.1",
        settings["xapi_broker_port"],
        *as_admin(settings, ["ACL", "LOG", "128"]),
    )
    entries = [dict(zip(e[::2], e[1::2], strict=True)) for e in out["replies"][1]]
    unexpected = [
        (e["reason"], e["object"])
        for e in entries
        if e["username"] == settings["xapi_broker_user"]
        and e["reason"] != "auth"
        and e["object"] not in PROVOKED_DENIALS
    ]
    assert unexpected == []


def test_queued_message_survives_restart_and_crash(frontal, settings):
    # Last: a restart also empties ACL LOG, which the test above reads.
    port = settings["xapi_broker_port"]
    db = settings["xapi_broker_db"]
    out = resp(
        frontal,
        "127.0.0.1",
        port,
        *as_admin(
            settings,
            ["SELECT", db],
            ["DEL", DURABILITY_KEY],
            ["LPUSH", DURABILITY_KEY, "statement"],
        ),
    )
    assert out["replies"][-1] == 1
    frontal.check_output(f"systemctl restart {UNIT}")
    wait_ready(frontal, settings)
    out = resp(
        frontal,
        "127.0.0.1",
        port,
        *as_admin(settings, ["SELECT", db], ["LPUSH", DURABILITY_KEY, "s2"]),
    )
    assert out["replies"][-1] == 2
    time.sleep(2)  # appendfsync everysec: past the fsync, a crash loses nothing
    frontal.check_output(f"systemctl kill -s KILL {UNIT}")
    time.sleep(1)
    wait_ready(frontal, settings)
    out = resp(
        frontal,
        "127.0.0.1",
        port,
        *as_admin(settings, ["SELECT", db], ["LLEN", DURABILITY_KEY], ["DEL", DURABILITY_KEY]),
    )
    assert out["replies"][1:] == ["+OK", 2, 1]
