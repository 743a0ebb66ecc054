"""Five faults while a known set of statements streams from the frontal, then a full count.

The scenario's hosts are Debian 13 (trixie: Redis 8.0, Python 3.13); the others run Debian 12.

Each statement has a known id; one in 25 is one the LRS must refuse. Pod's own producer
enqueues them at a steady rate on the frontal while, one after the other, the LRS stops for
35 s, the worker is SIGKILLed, Redis restarts, the encoding host restarts, and the worker's
LRS password goes wrong until site.yml is run again. Afterwards every valid id must be in
Ralph's store exactly once, every invalid one in the dead letters with the LRS's refusal,
and the queue empty. The table printed (and written to the scenario's reliability-report.md)
is the one of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hosts import (
    FILES,
    WORK,
    WORKER_ENV,
    acl_log,
    all_dead_letters,
    assert_accounted,
    broker_state,
    container,
    copy_to,
    host_booted,
    lrs_store_ids,
    main_pid,
    pod_python,
    produced,
    service_active,
    sh,
    wait_settled,
)
from xapi_testsupport.polling import wait_until
from xapi_testsupport.statements import agent, invalid, now
from xapi_testsupport.statements import statement as build_statement

STATEMENTS = int(os.environ.get("XAPI_RES_STATEMENTS", "1200"))
RATE = float(os.environ.get("XAPI_RES_RATE", "4"))  # statements per second
INVALID_EVERY = 25
LRS_OUTAGE = 35  # seconds
PAUSE = 10  # seconds between two faults
WORKER = "celeryd-xapi@xapi.service"
# ACL LOG of the xAPI instance just before its restart (which empties it).
ACL_LOG_BEFORE_RESTART: list[dict[str, Any]] = []


def statement(n: int) -> tuple[dict[str, Any], bool]:
    """Statement number n, and whether the LRS must accept it."""
    body = build_statement(
        "played",
        actor=agent(f"student {n % 40}", f"mailto:student{n % 40}@example.org"),
        object_id=f"https://pod.example.org/video/{n % 97:04d}/",
        timestamp=now(),
    )
    if n % INVALID_EVERY != INVALID_EVERY - 1:
        return body, True
    # What a buggy caller could queue: each breaks a rule every LRS enforces.
    return invalid(body, n // INVALID_EVERY), False


@dataclass
class Phase:
    fault: str
    started: float
    ended: float = 0.0
    in_flight_at_start: set[str] = field(default_factory=set)
    detail: str = ""

    def ids(self, enqueued: list[tuple[float, str, int]]) -> set[str]:
        """The statements this fault could lose: those not yet settled when it began, and
        those enqueued while it lasted."""
        during = {i for stamp, i, _ in enqueued if self.started <= stamp < self.ended}
        return self.in_flight_at_start | during


def settled() -> set[str]:
    return set(lrs_store_ids()) | {d["id"] for d in broker_state()["dead"]}


def run_fault(name: str, action: Callable[[], str]) -> Phase:
    phase = Phase(name, started=time.time())
    phase.in_flight_at_start = {i for _, i, _ in produced()} - settled()
    phase.detail = action()
    phase.ended = time.time()
    print(f"  {name}: {phase.detail} ({len(phase.in_flight_at_start)} in flight at the start)")
    time.sleep(PAUSE)
    return phase


def worker_log_since(stamp: float) -> str:
    return sh(
        "encodage", f"journalctl --no-pager -o cat -u 'celeryd-xapi@*' --since @{int(stamp)}"
    ).stdout


# --- the faults ---------------------------------------------------------------------------


def lrs_outage() -> str:
    sh("lrs", "systemctl stop ralph-lrs")
    time.sleep(LRS_OUTAGE)
    sh("lrs", "systemctl start ralph-lrs")
    assert wait_until(lambda: service_active("lrs", "ralph-lrs"), 30)
    return f"Ralph stopped for {LRS_OUTAGE} s"


def worker_sigkill() -> str:
    before = main_pid("encodage", WORKER)
    # Strike while the worker holds messages it has not acknowledged (a batch in the making).
    held = broker_state("wait-unacked", "30")
    began = time.monotonic()
    killed_at = time.time()
    sh("encodage", f"systemctl kill --signal=SIGKILL {WORKER}")
    stranded = broker_state()["unacked"]
    back = wait_until(
        lambda: (
            main_pid("encodage", WORKER) not in ("0", before) and service_active("encodage", WORKER)
        ),
        60,
    )
    assert back, "systemd did not restart the worker after SIGKILL"
    took = time.monotonic() - began
    return (
        f"SIGKILL to every worker process while it held {held} unacknowledged messages "
        f"({stranded} left unacknowledged by the dead worker) at {killed_at:.3f}; restarted by "
        f"systemd in {took:.0f} s"
    )


def redis_restart() -> str:
    """The xAPI instance, then Pod's own Redis: each restart leaves the other one serving
    (the stream goes on through the second; Pod's page views through the first)."""
    ACL_LOG_BEFORE_RESTART[:] = acl_log()
    began = time.monotonic()
    sh("frontal", "systemctl restart redis-server@xapi")
    xapi_took = time.monotonic() - began
    assert pod_page_served(), "Pod's pages failed while the xAPI instance restarted"
    began = time.monotonic()
    sh("frontal", "systemctl restart redis-server")
    pod_took = time.monotonic() - began
    assert wait_until(pod_page_served, 20), "Pod's pages did not come back after its Redis"
    return (
        f"redis-server@xapi restarted in {xapi_took:.1f} s, then Pod's redis-server in "
        f"{pod_took:.1f} s; Pod's pages served after each"
    )


POD_PAGE = 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8000/", timeout=5)'


def pod_page_served() -> bool:
    """Pod's stand-in uWSGI answers a page view (it reads its session and writes its cache in
    Pod's Redis)."""
    page = sh("frontal", f"/usr/bin/python3 -c {shlex.quote(POD_PAGE)}", check=False)
    return page.returncode == 0


def host_restart() -> str:
    began = time.monotonic()
    subprocess.run(
        ["podman", "restart", "-t", "60", container("encodage")], check=True, capture_output=True
    )
    up = wait_until(lambda: host_booted("encodage") and service_active("encodage", WORKER), 120)
    assert up, "the worker did not come back after the encoding host restarted"
    return f"encoding host restarted, worker consuming again after {time.monotonic() - began:.0f} s"


def wrong_password(playbook: Callable[..., Any], evidence: dict[str, Any]) -> Callable[[], str]:
    def action() -> str:
        since = time.time()
        sh(
            "encodage",
            f"sed -i 's/^XAPI_LRS_PWD=.*/XAPI_LRS_PWD=\"not-the-password-0000\"/' "
            f"{WORKER_ENV} && systemctl restart celeryd-xapi.service",
        )
        assert wait_until(lambda: "401" in worker_log_since(since), 60), (
            "the worker never met the LRS's 401"
        )
        time.sleep(15)
        began = time.monotonic()
        run = playbook("site.yml", "-v")
        evidence["playbook -v"] = run.stdout + run.stderr
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert "not-the-password" not in sh("encodage", f"cat {WORKER_ENV}").stdout
        took = time.monotonic() - began
        return (
            f"wrong LRS password in the worker's settings; site.yml -v repaired it in {took:.0f} s"
        )

    return action


# --- the run ------------------------------------------------------------------------------


def test_faults_lose_nothing(playbook, evidence, report_path) -> None:
    plan = [statement(n) for n in range(STATEMENTS)]
    valid = {s["id"] for s, ok in plan if ok}
    invalid = {s["id"] for s, ok in plan if not ok}
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps([s for s, _ in plan]))
        sh("frontal", f"rm -rf {WORK} && install -d -o pod -g pod -m 0750 {WORK}")
        for source in (plan_file, FILES / "producer.py", FILES / "broker_state.py"):
            copy_to("frontal", source, f"{WORK}/{source.name}")
    sh("frontal", f"chown -R pod:pod {WORK}")
    assert broker_state()["queue"] == 0

    # Pod's producer in the background, as a transient unit of the frontal.
    started = time.time()
    sh(
        "frontal",
        "systemd-run --unit=xapi-resilience-producer --collect --quiet sh -c "
        + shlex.quote(
            pod_python(
                f"{WORK}/producer.py", f"{WORK}/plan.json", f"{WORK}/progress.tsv", str(RATE)
            )
        ),
    )
    assert wait_until(lambda: len(produced()) >= 40 and len(lrs_store_ids()) > 0, 60), (
        "the pipeline did not deliver before the faults"
    )
    print(f"\nstreaming {STATEMENTS} statements ({len(invalid)} invalid) at {RATE:g}/s")
    phases = [
        run_fault("LRS stopped", lrs_outage),
        run_fault("worker SIGKILLed", worker_sigkill),
        run_fault("Redis restarted", redis_restart),
        run_fault("encoding host restarted", host_restart),
        run_fault("LRS password wrong, fixed by site.yml", wrong_password(playbook, evidence)),
    ]
    assert wait_until(lambda: len(produced()) >= STATEMENTS, STATEMENTS / RATE + 120, 5)
    everything = valid | invalid

    elapsed = wait_settled(everything, 300) - started

    stored = lrs_store_ids()
    state = broker_state()
    dead = all_dead_letters(state)  # the broker's list and the worker's disk
    enqueued = produced()
    refused = sum(r for _, _, r in enqueued)
    rows = [(p.fault, p.ids(enqueued)) for p in phases] + [("all statements", everything)]
    table = [
        "| fault | statements in flight | delivered | dead-lettered | lost |",
        "|---|---:|---:|---:|---:|",
    ]
    lost_by_fault: dict[str, set[str]] = {}
    lost_earlier: set[str] = set()
    for fault, all_ids in rows:
        # A statement lost during one fault stays "in flight" at the start of every later
        # one: count it under the first only.
        ids = all_ids if fault == "all statements" else all_ids - lost_earlier
        delivered = len(ids & set(stored))
        dead_lettered = len(ids & set(dead))
        lost_by_fault[fault] = ids - set(stored) - set(dead)
        if fault != "all statements":
            lost_earlier |= lost_by_fault[fault]
        lost = len(lost_by_fault[fault])
        table.append(f"| {fault} | {len(ids)} | {delivered} | {dead_lettered} | {lost} |")
    lines = [
        f"{STATEMENTS} statements ({len(valid)} valid, {len(invalid)} invalid) streamed at "
        f"{RATE:g}/s by Pod's producer; {refused} publish attempts refused during the Redis "
        f"restart and repeated; the last statement settled {elapsed:.0f} s after the first "
        "was enqueued.",
        "",
        *table,
        "",
        *[f"- {p.fault}: {p.detail}" for p in phases],
        f"- queue `xapi` at the end: {state['queue']} waiting, {state['unacked']} "
        f"unacknowledged, {state['in_flight']} in the workers' in-flight lists, "
        f"{state['spooled']} in the nodes' spools",
    ]
    report = "\n".join(lines)
    print("\n" + report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report + "\n")

    missing = everything - set(stored) - set(dead)
    stamps = {i: stamp for stamp, i, _ in enqueued}
    for statement_id in sorted(missing):
        fault = next(f for f, ids in lost_by_fault.items() if statement_id in ids)
        print(f"lost: {statement_id}, enqueued at {stamps.get(statement_id)}, during {fault}")
    # Nothing may be lost: not even kombu's BRPOP-then-HSET window, which the worker's
    # transport closes (xapi_worker/src/xapi_worker/transport.py, docs/reliability.md).
    for fault, lost_ids in list(lost_by_fault.items())[:-1]:
        assert not lost_ids, f"{fault}: {len(lost_ids)} lost ({sorted(lost_ids)[:5]})"
    assert not missing, f"{len(missing)} statements lost"
    assert_accounted(valid, invalid, stored, dead)
    assert (state["queue"], state["unacked"], state["in_flight"], state["spooled"]) == (0, 0, 0, 0)
    assert all(p.ids(enqueued) for p in phases), "a fault hit an idle pipeline"


def test_no_acl_denial_through_the_faults() -> None:
    """Redis 7.2+ (Debian 13 has 8.0) logs every command an ACL refuses, and redis-py 5 runs
    CLIENT SETINFO on each connection: the xAPI users' ACL must cover what the producer, the
    worker, its SIGKILL and restart, the host's restart and `celery inspect ping` run.
    Read before the Redis restart (which empties ACL LOG) and at the end. The intrusion
    tests, which provoke refusals on purpose, come after this module."""
    ping = sh(
        "encodage",
        f"cd /opt/xapi-worker && runuser -u xapi-worker -- env XAPI_WORKER_CONFIG={WORKER_ENV} "
        "/opt/xapi-worker/bin/celery -A xapi_worker.app inspect ping -t 10",
        check=False,
    )
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    for when, entries in (
        ("before the Redis restart", ACL_LOG_BEFORE_RESTART),
        ("at the end", acl_log()),
    ):
        denied = [(e.get("username"), e.get("reason"), e.get("object")) for e in entries]
        assert denied == [], f"ACL LOG {when}: {denied}"
