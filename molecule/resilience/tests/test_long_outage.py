"""A long LRS outage with the broker's memory held small: the spool takes what Redis cannot.

The xAPI instance runs with `maxmemory 16mb` in this scenario (host_vars/res-frontal.yml),
room for about 5,000 queued statements (~3.1 kB each, roles/xapi_broker README). Ralph is stopped,
and Pod's own producer streams 25,000 statements into queue `xapi`: five times what the
broker could hold. During the outage the worker is SIGKILLed (at a third of the stream) and
the encoding host restarts (at two thirds). Expected:

- no publish refused on the frontal, and the broker's memory never above its limit (sampled
  every 0.5 s, and Redis's own `used_memory_peak`);
- at the end of the stream every statement is in the encoding host's spool, none in Redis;
- once Ralph is back: every valid statement stored exactly once, every invalid one
  dead-lettered with the LRS's refusal, nothing left in the broker or the spool.

Runs after test_faults and test_intrusion (file order), on the same deployed lab. The report
is written beside reliability-report.md (long-outage-report.md) and is the row of
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hosts import (
    FILES,
    LRS_STORE,
    WORK,
    all_dead_letters,
    assert_accounted,
    broker_state,
    container,
    copy_to,
    host_booted,
    lab_settings,
    lrs_store_ids,
    main_pid,
    pod_python,
    produced,
    redis_admin,
    secrets,
    service_active,
    sh,
    wait_settled,
)
from xapi_testsupport.polling import wait_until
from xapi_testsupport.statements import agent, invalid, now
from xapi_testsupport.statements import statement as build_statement

STATEMENTS = int(os.environ.get("XAPI_RES_OUTAGE_STATEMENTS", "25000"))
# Around each fault the stream runs at 50/s, the rate the broker's sizing is written for
# (roles/xapi_broker README): the worker is away for about a minute when its host restarts
# (docs/reliability.md), ~3,000 statements, which must fit in the 16 MB the broker has.
# Between the faults the worker is there to take what comes, and the stream runs faster: the
# test then waits on the pipeline, not on a clock.
SLOW = float(os.environ.get("XAPI_RES_OUTAGE_RATE", "50"))
FAST = float(os.environ.get("XAPI_RES_OUTAGE_FAST_RATE", "200"))
# Fewer invalid ones than in test_faults: each costs a bisection of its batch (about 14
# POSTs) once the LRS is back, and Ralph's FS backend re-reads its store on every POST.
INVALID_EVERY = 500
MAXMEMORY = 16 * 1024 * 1024
WORKER = "celeryd-xapi@xapi.service"
PROGRESS = f"{WORK}/outage-progress.tsv"
RATE_FILE = f"{WORK}/outage-rate"
HISTORY = "/var/lib/ralph/history.json"


def statement(n: int) -> tuple[dict[str, Any], bool]:
    body = build_statement(
        "played",
        actor=agent(f"learner {n % 300}", f"mailto:learner{n % 300}@example.org"),
        object_id=f"https://pod.example.org/video/{n % 211:04d}/",
        timestamp=now(),
    )
    if n % INVALID_EVERY != INVALID_EVERY - 1:
        return body, True
    return invalid(body, n // INVALID_EVERY), False


def enqueued_count() -> int:
    out = sh("frontal", f"[ -f {PROGRESS} ] && wc -l < {PROGRESS} || echo 0").stdout.strip()
    return int(out or 0)


def spool() -> dict[str, int]:
    return broker_state("spool")


class MemorySampler:
    """`INFO memory` of the xAPI instance every 0.5 s, from one redis-cli loop on the frontal
    (the default user's password on stdin, never in argv)."""

    def __init__(self) -> None:
        port = lab_settings()["xapi_broker_port"]
        loop = (
            "read -r REDISCLI_AUTH && export REDISCLI_AUTH && while :; do "
            f"redis-cli --user default -p {port} INFO memory | grep '^used_memory:'; "
            "sleep 0.5; done"
        )
        self.process = subprocess.Popen(
            ["podman", "exec", "-i", container("frontal"), "sh", "-c", loop],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(secrets()["Redis password (default user)"] + "\n")
        self.process.stdin.flush()
        self.samples: list[int] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("used_memory:"):
                self.samples.append(int(line.split(":", 1)[1]))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.thread.join(5)


def redis_info(field: str) -> str:
    values = dict(
        line.split(":", 1) for line in redis_admin("INFO", "memory").splitlines() if ":" in line
    )
    return values[field].strip()


def xapi_broker_maxmemory() -> int:
    return int(redis_admin("CONFIG", "GET", "maxmemory").split()[1])


def set_rate(rate: float) -> None:
    """The producer's rate from now on (it reads the file every half second)."""
    sh("frontal", f"echo {rate:g} > {RATE_FILE}.new && mv {RATE_FILE}.new {RATE_FILE}")
    time.sleep(1)


def sigkill_worker() -> str:
    before = main_pid("encodage", WORKER)
    began = time.monotonic()
    sh("encodage", f"systemctl kill --signal=SIGKILL {WORKER}")
    back = wait_until(
        lambda: (
            main_pid("encodage", WORKER) not in ("0", before) and service_active("encodage", WORKER)
        ),
        60,
    )
    assert back, "systemd did not restart the worker after SIGKILL"
    return f"worker SIGKILLed, restarted by systemd in {time.monotonic() - began:.0f} s"


def restart_host() -> str:
    began = time.monotonic()
    subprocess.run(
        ["podman", "restart", "-t", "60", container("encodage")], check=True, capture_output=True
    )
    up = wait_until(lambda: host_booted("encodage") and service_active("encodage", WORKER), 180)
    assert up, "the worker did not come back after the encoding host restarted"
    return f"encoding host restarted, worker running again after {time.monotonic() - began:.0f} s"


def test_long_outage_spools_what_the_broker_cannot_hold(report_path: Path) -> None:
    assert xapi_broker_maxmemory() == MAXMEMORY, "the scenario's broker is not held at 16 MiB"
    plan = [statement(n) for n in range(STATEMENTS)]
    valid = {s["id"] for s, ok in plan if ok}
    invalid_ids = {s["id"] for s, ok in plan if not ok}
    everything = valid | invalid_ids
    # Ralph away, with an empty store for when it comes back (its FS backend re-reads the
    # whole store on every POST; the earlier tests' statements are accounted for already).
    sh("lrs", f"systemctl stop ralph-lrs && rm -f {LRS_STORE}/* {HISTORY}")
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "outage-plan.json"
        plan_file.write_text(json.dumps([s for s, _ in plan]))
        copy_to("frontal", plan_file, f"{WORK}/outage-plan.json")
        copy_to("frontal", FILES / "producer.py", f"{WORK}/producer.py")
    sh("frontal", f"rm -f {PROGRESS} && chown -R pod:pod {WORK}")
    set_rate(FAST)
    spool_before = spool()["depth"]

    sampler = MemorySampler()
    started = time.time()
    sh(
        "frontal",
        "systemd-run --unit=xapi-outage-producer --collect --quiet sh -c "
        + shlex.quote(
            pod_python(f"{WORK}/producer.py", f"{WORK}/outage-plan.json", PROGRESS, RATE_FILE)
        ),
    )
    faults = []
    try:
        for fault, share in ((sigkill_worker, 1), (restart_host, 2)):
            assert wait_until(
                lambda share=share: enqueued_count() >= share * STATEMENTS // 3,
                STATEMENTS / SLOW,
                2,
            )
            set_rate(SLOW)
            faults.append(fault())
            set_rate(FAST)
        assert wait_until(lambda: enqueued_count() >= STATEMENTS, STATEMENTS / SLOW + 120, 5)
        stream_took = time.time() - started

        def all_spooled() -> bool:
            state = broker_state()
            waiting = state["queue"] or state["unacked"] or state["in_flight"]
            return not waiting and spool()["depth"] - spool_before >= STATEMENTS

        assert wait_until(all_spooled, 300, 5), (
            f"not everything reached the spool while the LRS was away: {broker_state()}, "
            f"spool {spool()}"
        )
    finally:
        sampler.stop()
    at_peak = spool()
    peak = int(redis_info("used_memory_peak"))
    rows = produced(PROGRESS)
    refused = sum(r for _, _, r in rows)

    # Ralph back: the spool drains, oldest first, while nothing new arrives.
    back = time.time()
    sh("lrs", "systemctl start ralph-lrs")
    drain_took = wait_settled(everything, 1800) - back

    stored = lrs_store_ids()
    state = broker_state()
    dead = all_dead_letters(state)  # the broker's list and the worker's disk
    lost = everything - set(stored) - set(dead)
    sampled = max(sampler.samples, default=0)
    report = "\n".join(
        [
            f"{STATEMENTS} statements ({len(valid)} valid, {len(invalid_ids)} invalid) streamed "
            f"by Pod's producer ({FAST:g}/s, {SLOW:g}/s around each fault) in "
            f"{stream_took:.0f} s while the LRS was "
            f"stopped; broker maxmemory {MAXMEMORY // 2**20} MiB (noeviction).",
            "",
            "| long LRS outage | statements | delivered | dead-lettered | lost |",
            "|---|---:|---:|---:|---:|",
            f"| LRS stopped for the whole stream, worker SIGKILLed, encoding host restarted "
            f"| {len(everything)} | {len(everything & set(stored))} "
            f"| {len(everything & set(dead))} | {len(lost)} |",
            "",
            f"- publishes refused: {refused}",
            f"- broker used_memory: {sampled / 2**20:.1f} MiB at most in {len(sampler.samples)} "
            f"samples (0.5 s), used_memory_peak {peak / 2**20:.1f} MiB",
            f"- the spool at the end of the stream: {at_peak['depth']} statements, "
            f"{at_peak['bytes'] / 2**20:.1f} MiB on disk",
            *[f"- {fault}" for fault in faults],
            f"- the LRS restarted: the spool drained in {drain_took:.0f} s "
            f"({len(everything) / max(drain_took, 1):.0f} statements/s into Ralph's FS backend)",
            f"- at the end: {state['queue']} queued, {state['unacked']} unacknowledged, "
            f"{state['in_flight']} in flight, {state['spooled']} spooled",
        ]
    )
    print("\n" + report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    (report_path.parent / "long-outage-report.md").write_text(report + "\n")

    assert refused == 0, f"{refused} publishes refused by the broker"
    assert sampled <= MAXMEMORY and peak <= MAXMEMORY, (sampled, peak)
    assert sampler.samples, "no memory sample was read"
    assert not lost, f"{len(lost)} statements lost ({sorted(lost)[:5]})"
    assert_accounted(valid, invalid_ids, stored, dead)
    assert (state["queue"], state["unacked"], state["in_flight"], state["spooled"]) == (0,) * 4
