"""Every way in is refused, and no password is left where others can read it.

Runs after test_faults, so that the hosts' journals and files hold a whole eventful life:
deployment, five faults, a repair by site.yml.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import time
import uuid

import pytest
from hosts import (
    FILES,
    HOSTS,
    WORK,
    broker_state,
    container,
    copy_to,
    lrs_store_ids,
    main_pid,
    pod_python,
    secrets,
    service_active,
    sh,
)
from xapi_testsupport.polling import wait_until

# The xAPI instance's port (roles/xapi defaults); Pod's own Redis is on 6379, loopback only.
REDIS = f"{container('frontal')} 6380"

# A RESP exchange with the broker, without credentials (python3 is on every host, redis-cli
# is not). Prints the first reply line, or the connection error.
RAW_REDIS = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"*2\\r\\n$4\\r\\nLLEN\\r\\n$4\\r\\nxapi\\r\\n")
    print(s.recv(200).decode().splitlines()[0])
except OSError as exc:
    print(f"connection failed: {type(exc).__name__}")
"""


def raw_redis(host: str) -> str:
    return sh(host, f"python3 - {REDIS}", stdin=RAW_REDIS).stdout.strip()


def test_redis_refuses_a_client_without_credentials() -> None:
    assert raw_redis("encodage").startswith("-NOAUTH")


def test_redis_is_unreachable_from_the_lrs_host() -> None:
    assert raw_redis("lrs").startswith("connection failed"), "the lrs host reached Redis"


def test_pickle_message_is_refused_not_executed() -> None:
    token = f"pickle-{uuid.uuid4().hex[:12]}"
    copy_to("frontal", FILES / "pickle_attack.py", f"{WORK}/pickle_attack.py")
    since = int(time.time()) - 1
    sent = sh("frontal", pod_python(f"{WORK}/pickle_attack.py", token))
    assert "sent" in sent.stdout
    log = f"journalctl --no-pager -o cat --since @{since}"

    def reported() -> bool:
        text = sh("encodage", f"{log} -u 'celeryd-xapi@*'").stdout.lower()
        return "pickle" in text

    assert wait_until(reported, 60), "the worker did not report the pickle message"
    assert wait_until(lambda: broker_state()["queue"] == 0, 30), "the message stayed queued"
    time.sleep(3)
    for host in HOSTS:
        assert token not in sh(host, f"{log} -t xapi-pickle-executed").stdout, (
            f"the pickle payload ran on {host}"
        )
    print("\n" + sh("encodage", f"{log} -u 'celeryd-xapi@*' | grep -i pickle").stdout.strip())


# Security review point 4: the web application's credentials (the broker URL of Pod's
# settings_local.py on the frontal, the producer's user) can queue a statement, nothing more.
def webapp_attack(what: str) -> dict[str, str]:
    copy_to("frontal", FILES / "webapp_attack.py", f"{WORK}/webapp_attack.py")
    out = sh("frontal", pod_python(f"{WORK}/webapp_attack.py", what), timeout=120).stdout
    results = json.loads(out.strip().splitlines()[-1])
    print("\n" + "\n".join(f"{name}: {answer}" for name, answer in results.items()))
    return results


def all_refused(results: dict[str, str]) -> list[str]:
    """The attempts not refused by an ACL. Redis 7.0 says "User ... has no permissions to
    run ..."; Redis 8.0 says "No permissions to access a key" for a key in a pipeline."""
    return [
        f"{name}: {answer}"
        for name, answer in results.items()
        if not (answer.startswith("refused:") and "no permissions" in answer.lower())
    ]


def test_web_app_credentials_cannot_read_or_delete_the_queue() -> None:
    """Not the queue, the in-flight lists, unacked or the dead letters; nor the keyspace."""
    before = broker_state()
    results = webapp_attack("queue")
    assert len(results) >= 15
    assert all_refused(results) == []
    after = broker_state()
    assert after["dead"] == before["dead"], "the dead letters changed"


def test_web_app_credentials_cannot_stop_the_workers() -> None:
    """Celery's remote control (shutdown, cancel_consumer, pool_shrink, inspect) and the
    workers' event channels are refused; the worker runs on, same process, and answers."""
    pid = main_pid("encodage", "celeryd-xapi@xapi")
    results = webapp_attack("control")
    assert all_refused(results) == []
    time.sleep(3)
    assert service_active("encodage", "celeryd-xapi@xapi")
    assert main_pid("encodage", "celeryd-xapi@xapi") == pid, "the worker was restarted"


def test_web_app_credentials_cannot_run_lua() -> None:
    """EVAL, SCRIPT LOAD + EVALSHA (EVAL in two steps), FUNCTION LOAD and FCALL are refused:
    a busy loop would have frozen Redis for every client. Redis still answers at once."""
    results = webapp_attack("lua")
    assert all_refused(results) == []
    started = time.monotonic()
    broker_state()
    assert time.monotonic() - started < 10, "the broker is slow to answer"


def test_web_app_credentials_still_queue_statements() -> None:
    """What the producer's user is for: Pod's own .delay() goes through and is delivered."""
    token = str(uuid.uuid4())  # the statement's id: Ralph wants a UUID
    code = (
        "import sys; from pod.xapi.xapi_tasks import send_xapi_statement_task as t; "
        "t.delay({'id': sys.argv[1], 'actor': {'mbox': 'mailto:acl@example.org'}, "
        "'verb': {'id': 'http://adlnet.gov/expapi/verbs/experienced'}, "
        "'object': {'id': 'https://pod.example.org/video/0004/'}}); print('sent')"
    )
    sent = sh("frontal", pod_python("-c " + shlex.quote(code), token))
    assert "sent" in sent.stdout
    assert wait_until(lambda: token in lrs_store_ids(), 90), "the statement was not delivered"


@pytest.mark.parametrize("host", HOSTS)
def test_no_password_in_process_list(host: str) -> None:
    listing = sh(host, "ps -eo user,args").stdout
    for what, secret in secrets().items():
        assert secret not in listing, f"{what} in `ps` on {host}"


@pytest.mark.parametrize("host", HOSTS)
def test_no_password_in_the_journal(host: str) -> None:
    # The worker logs to the journal (celeryd-xapi@*), so this covers the worker log too.
    journal = sh(host, "journalctl --no-pager -o cat", timeout=300).stdout
    assert journal, f"empty journal on {host}"
    for what, secret in secrets().items():
        assert secret not in journal, f"{what} in the journal of {host}"


def test_no_password_in_the_worker_log() -> None:
    log = sh("encodage", "journalctl --no-pager -o cat -u 'celeryd-xapi@*'").stdout
    assert "ready." in log or "Connected to" in log, "no worker log found"
    extra = sh("encodage", "cat /var/log/celery/* 2>/dev/null || true").stdout
    for what, secret in secrets().items():
        assert secret not in log + extra, f"{what} in the worker log"


def test_no_password_in_the_check_the_metrics_or_the_event_lines() -> None:
    """check_xapi's line (as NRPE's nagios user), the metrics file for node_exporter and the
    worker's JSON event lines (xapi_worker.events) hold no password; the event lines parse."""
    outputs = {
        host: sh(
            host,
            "runuser -u nagios -- /usr/lib/nagios/plugins/check_xapi "
            "-C /etc/xapi-monitoring/check_xapi.json",
            check=False,
        ).stdout
        for host in ("frontal", "encodage")
    }
    assert all(out.startswith("XAPI ") for out in outputs.values()), outputs
    sh("frontal", "systemctl start xapi-metrics.service")
    outputs["metrics"] = sh("frontal", "cat /var/lib/prometheus/node-exporter/xapi.prom").stdout
    assert "xapi_statements_delivered_total" in outputs["metrics"]
    log = sh("encodage", "journalctl --no-pager -o cat -u 'celeryd-xapi@*'").stdout
    events = []
    for line in log.splitlines():
        if '"event": ' in line:  # the JSON object after Celery's "[time: LEVEL/process] "
            with contextlib.suppress(ValueError):
                event = json.loads(line[line.index('{"') :])
                if isinstance(event, dict) and "event" in event:
                    events.append(event)
    kinds = {e.get("event") for e in events}
    # With the spool on, a failing LRS sends batches to the spool after a few retries.
    assert {"delivered", "dead_letter"} <= kinds and kinds & {"retry", "spooled"}, events[:5]
    outputs["events"] = "\n".join(json.dumps(e) for e in events)
    for what, secret in secrets().items():
        for where, text in outputs.items():
            assert secret not in text, f"{what} in {where}"
    # Learners' identities stay out of the event lines: ids only.
    assert "mailto:" not in outputs["events"]


def test_no_password_in_ansible_playbook_verbose_output(evidence, playbook) -> None:
    output = evidence.get("playbook -v")
    if output is None:  # test_faults was not run: run site.yml -v here
        run = playbook("site.yml", "-v")
        assert run.returncode == 0, run.stdout[-3000:]
        output = run.stdout + run.stderr
    assert "changed=" in output
    for what, secret in secrets().items():
        assert secret not in output, f"{what} in `ansible-playbook -v` output"


# World-readable regular files (the other bits, o+r), outside the kernel's pseudo-filesystems.
# The passwords reach grep through a private (0600) pattern file, never its command line.
WORLD_READABLE = (
    "patterns=$(mktemp) && cat > $patterns && "
    "{ find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o "
    "-type f -perm -o+r -size -20M -print0 | xargs -0 grep -lF -f $patterns 2>/dev/null; "
    "rm -f $patterns; }"
)


@pytest.mark.parametrize("host", HOSTS)
def test_no_password_in_world_readable_files(host: str) -> None:
    # A planted world-readable canary proves the sweep reads files at all: an empty answer
    # from a broken find or grep must not pass for a clean host.
    canary = f"xapi-canary-{uuid.uuid4().hex}"
    sh(host, f"echo {canary} > /var/tmp/xapi-canary && chmod 0644 /var/tmp/xapi-canary")
    try:
        patterns = "\n".join([*secrets().values(), canary]) + "\n"
        found = sh(host, WORLD_READABLE, stdin=patterns, timeout=600).stdout.split()
    finally:
        sh(host, "rm -f /var/tmp/xapi-canary")
    assert "/var/tmp/xapi-canary" in found, f"the sweep did not find its canary on {host}"
    found.remove("/var/tmp/xapi-canary")
    assert not found, f"world-readable files holding a password on {host}: {found}"


def test_no_worker_process_runs_as_root() -> None:
    listing = sh("encodage", "ps -eo user:20,args").stdout.splitlines()
    workers = [line.split(None, 1) for line in listing if "celery" in line and "worker" in line]
    assert all(user != "root" for user, _ in workers), workers
    # The bundled worker runs as its own user (roles/xapi_encodage: xapi_encodage_worker_user);
    # Pod's own encoding worker, beside it, stays Pod's (pod).
    xapi = {user for user, args in workers if "xapi_worker.app" in args}
    assert xapi == {"xapi-worker"}, workers


# Live exposure of xapi-metrics.service as it ran as root, measured on the lab's frontal
# (Debian 12, systemd 252): 2.0. Now an unprivileged user with more of the sandbox.
METRICS_UNIT_MAX_EXPOSURE = 2.0


def test_the_metrics_writer_is_not_root() -> None:
    """xapi-metrics.service parses what the broker's clients write: it runs as the
    unprivileged xapi-metrics user (round two, finding 4), writes its own directory, and its
    systemd-analyze exposure is no higher than as root."""
    unit = "xapi-metrics.service"
    assert sh("frontal", f"systemctl show -p User --value {unit}").stdout.strip() == "xapi-metrics"
    sh("frontal", f"systemctl start {unit}")
    prom = "/var/lib/prometheus/node-exporter/xapi.prom"
    listing = sh("frontal", f"stat -c '%U %F' {prom} && stat -L -c '%U %a' {prom}").stdout
    assert listing.split("\n")[:2] == ["root symbolic link", "xapi-metrics 644"], listing
    score = sh("frontal", f"systemd-analyze security --no-pager {unit}").stdout
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", score)
    assert found, score[-500:]
    print(f"\n{unit} live exposure: {found.group(1)}")
    assert float(found.group(1)) <= METRICS_UNIT_MAX_EXPOSURE


# --- Pod's Redis port taken (security review, round two, finding 1) -------------------------
# Last in the file: it stops Pod's Redis on the frontal for a while (and starts it again).
POD_REDIS_PORT = 6379


def start_fake_redis(mode: str) -> str:
    """As pod, a listener on Pod's Redis port (Pod's Redis stopped): its capture file."""
    capture = f"{WORK}/fake-redis-{mode}.bin"
    # pod's working directory (made by earlier tests in a whole run; made here when alone).
    sh("frontal", f"mkdir -p {WORK} && chown pod:pod {WORK}")
    copy_to("frontal", FILES / "fake_redis.py", f"{WORK}/fake_redis.py")
    sh(
        "frontal",
        f"chmod 0644 {WORK}/fake_redis.py && systemctl stop redis-server.service && "
        f"runuser -u pod -- setsid python3 {WORK}/fake_redis.py {POD_REDIS_PORT} {capture} "
        f"{mode} > {WORK}/fake-redis.log 2>&1 < /dev/null & echo $! > {WORK}/fake-redis.pid",
    )
    # Pod's Redis is stopped: whatever listens now is pod's (ss may not name another user's
    # process in a container).
    listening = f"ss -Hltn 'sport = :{POD_REDIS_PORT}' | grep -q LISTEN"
    assert wait_until(lambda: sh("frontal", listening, check=False).returncode == 0, 20), (
        "pod's listener did not start"
    )
    return capture


def stop_fake_redis() -> None:
    sh(
        "frontal",
        f"kill $(cat {WORK}/fake-redis.pid); sleep 1; systemctl start redis-server.service",
        check=False,
    )


@pytest.mark.parametrize(
    ("mode", "run"),
    [("refuse", "site.yml"), ("accept", "redis-migrate.yml")],
    ids=["refusing-site.yml", "accepting-migrate"],
)
def test_a_listener_on_pod_redis_port_gets_no_password(playbook, mode: str, run: str) -> None:
    """`pod` binds Pod's Redis port on the broker host while Pod's Redis is down, answering like
    a password-protected Redis that refuses every login (the old move then sent the workers'
    password, then the administrator's) or accepts it: the run sends it nothing, fails, and
    says why; the plays before the move are done."""
    capture = start_fake_redis(mode)
    try:
        result = playbook(run)
        received = sh("frontal", f"cat {capture}").stdout
    finally:
        stop_fake_redis()
    # Without the colours molecule's environment forces on ansible-playbook.
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    for what, secret in secrets().items():
        assert secret not in received, f"{what} sent to pod's listener: {received[:300]!r}"
    assert received == "", f"the listener was sent {received[:300]!r}"
    assert result.returncode != 0, output[-3000:]
    assert "is not a redis-server run by redis" in output, output[-3000:]
    if run == "site.yml":  # the move is the last play: the others were done
        assert output.index("PLAY [Monitoring check") < output.index("PLAY [Move the statements")
        encodage_recap = re.escape(container("encodage")) + r"\s+:.*failed=0"
        assert re.search(encodage_recap, output), output[-2000:]


def test_the_xapi_instance_in_pod_redis_place_gets_nothing(playbook) -> None:
    """A redis-server run by `redis` is not yet Pod's Redis: the xAPI instance is one too (in
    redis-server@xapi.service). Pointed at it as Pod's Redis, the move used to log in there
    without a password and end rc 0; now it sends it nothing and fails, naming the service it
    expected and the variable (the review of what landed for issue 34)."""
    result = playbook("redis-migrate.yml", "-e", '{"xapi_broker_migrate_from_port": 6380}')
    output = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr).split())
    assert result.returncode != 0, output[-3000:]
    assert "not the service redis-server.service" in output, output[-3000:]
    assert "(xapi_broker_migrate_from_unit)" in output, output[-3000:]
