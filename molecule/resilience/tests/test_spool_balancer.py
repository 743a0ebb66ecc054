"""The spool drained through a balancer with one broken backend, and a far `Retry-After` on
the way (issue #33, items 2 and 5, on the deployed lab).

A balancer (files/lrs_balancer.py, a transient unit of the LRS host in front of Ralph) is put
between the worker and Ralph. Ralph is stopped (as in test_long_outage: the balancer then
answers 502 pages), and Pod's producer queues a few hundred statements, a handful of them
invalid: the worker puts them in its spool. Ralph comes back behind the balancer, whose
second backend is broken: every other POST is answered 503 with an HTML page. A few POSTs
into the drain, the balancer answers every POST 503 with `Retry-After` two years ahead: the
worker must hold for its cap (`XAPI_WORKER_RETRY_AFTER_MAX_SECONDS`), not for two years; it is
then restarted (rows parked beyond its longest retry delay are due at start:
xapi_worker/README.md), and the spool drains through the broken backend. Expected: every
valid statement stored once, none dead-lettered, every invalid one dead-lettered with the
LRS's refusal, nothing left in the queue, in flight or in the spool, within a bound computed
from the scenario's retry timers (host_vars/res-encodage.yml).

Runs last (file order), on the lab the other tests leave; Ralph's store is emptied first (its
FS backend re-reads the store on every POST; the earlier tests' statements are accounted for).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from hosts import (
    FILES,
    LRS_STORE,
    WORK,
    WORKER_ENV,
    all_dead_letters,
    broker_state,
    copy_to,
    lrs_store_ids,
    pod_python,
    produced,
    service_active,
    sh,
)
from xapi_testsupport.polling import wait_until
from xapi_testsupport.statements import agent, invalid, now
from xapi_testsupport.statements import statement as build_statement
from xapi_testsupport.worker_on_host import as_worker_command

ROOT = Path(__file__).resolve().parents[3]
VALID = 300
INVALID_EVERY = 50  # 6 invalid ones among the 300
RATE = 100.0  # statements per second
WORKER = "celeryd-xapi@xapi.service"
VENV = "/opt/xapi-worker"
HISTORY = "/var/lib/ralph/history.json"
PROGRESS = f"{WORK}/balancer-progress.tsv"
BALANCER_UNIT = "xapi-lrs-balancer"
BALANCER_DIR = "/usr/local/lib/xapi-lrs-balancer"  # root's: the unit's script
STATE = f"/var/lib/{BALANCER_UNIT}"  # its StateDirectory: the mode (root's) and the counts
BALANCER_PORT = 8101
# POSTs through the balancer before the far Retry-After: a drain under way, not finished.
FAR_AFTER = 24
# XAPI_RES_FAR_RETRY_AFTER=0 leaves the far Retry-After out: the drain through the broken
# backend alone (to try the test on a worker from before the Retry-After cap, which would
# otherwise wait two years).
FAR = os.environ.get("XAPI_RES_FAR_RETRY_AFTER", "1") != "0"


def worker_setting(name: str) -> float:
    """A worker setting as the scenario sets it (host_vars/res-encodage.yml), else its
    default (xapi_worker settings.py, read without importing the worker)."""
    values = yaml.safe_load((ROOT / "molecule/resilience/host_vars/res-encodage.yml").read_text())
    if name in values["xapi_encodage_worker_settings"]:
        return float(values["xapi_encodage_worker_settings"][name])
    tree = ast.parse((ROOT / "xapi_worker/src/xapi_worker/settings.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "") == "setting"
            and len(node.args) >= 3
            and ast.literal_eval(node.args[0]) == name
        ):
            return float(ast.literal_eval(node.args[2]))
    raise AssertionError(f"no default for {name} in xapi_worker/settings.py")


def retry_after_cap() -> float:
    """The longest Retry-After the deployed worker honours (XAPI_WORKER_RETRY_AFTER_MAX_SECONDS,
    written from xapi_encodage_retry_after_max_seconds): the scenario's value, else the role's
    default."""
    name = "xapi_encodage_retry_after_max_seconds"
    for path in (
        "molecule/resilience/host_vars/res-encodage.yml",
        "roles/xapi_encodage/defaults/main.yml",
    ):
        values = yaml.safe_load((ROOT / path).read_text())
        if name in values:
            return float(values[name])
    raise AssertionError(f"no {name} in the scenario or the role's defaults")


def statement(n: int) -> tuple[dict[str, Any], bool]:
    body = build_statement(
        "played",
        actor=agent(f"viewer {n % 30}", f"mailto:viewer{n % 30}@example.org"),
        object_id=f"https://pod.example.org/video/{n % 53:04d}/",
        timestamp=now(),
    )
    if n % INVALID_EVERY != INVALID_EVERY // 2:
        return body, True
    return invalid(body, n // INVALID_EVERY), False


def worker_cli(*args: str) -> list[dict[str, Any]]:
    """`xapi-worker ARGS` on the encoding host as the worker's user: its JSON lines."""
    command = as_worker_command(
        f"env XAPI_WORKER_CONFIG={WORKER_ENV} {VENV}/bin/xapi-worker {' '.join(args)}", cwd=VENV
    )
    out = sh("encodage", command).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def set_mode(mode: str) -> None:
    sh(
        "lrs",
        f"printf '%s\\n' {shlex.quote(mode)} > {STATE}/mode.new "
        f"&& mv {STATE}/mode.new {STATE}/mode",
    )


def balancer_counts() -> dict[str, int]:
    text = sh("lrs", f"cat {STATE}/counts 2>/dev/null || true").stdout.strip()
    return json.loads(text) if text else {}


def start_balancer() -> str:
    """The balancer on the LRS host, in front of Ralph's address; returns the worker's LRS
    URL through it."""
    exec_start = sh("lrs", "systemctl show -p ExecStart --value ralph-lrs").stdout
    ralph = re.search(r"--host (\S+) --port (\d+)", exec_start)
    assert ralph, exec_start
    sh("lrs", f"install -d -m 0755 {BALANCER_DIR}")
    copy_to("lrs", FILES / "lrs_balancer.py", f"{BALANCER_DIR}/lrs_balancer.py")
    sh("lrs", f"chown root:root {BALANCER_DIR}/lrs_balancer.py")
    sh(
        "lrs",
        # nobody's (DynamicUser= needs namespaces the lab's containers refuse: 226/NAMESPACE)
        f"systemd-run --unit={BALANCER_UNIT} --collect --quiet -p User=nobody "
        f"-p StateDirectory={BALANCER_UNIT} /usr/bin/python3 {BALANCER_DIR}/lrs_balancer.py "
        f"0.0.0.0 {BALANCER_PORT} {ralph[1]} {ralph[2]} {STATE}/mode {STATE}/counts",
    )
    set_mode("pass")
    # Up and passing to Ralph (which asks a GET without credentials for them: 401).
    probe = (
        "import urllib.request, urllib.error\n"
        f"try: urllib.request.urlopen('http://127.0.0.1:{BALANCER_PORT}/xAPI/statements/')\n"
        "except urllib.error.HTTPError as e: print(e.code)"
    )
    assert wait_until(
        lambda: sh("lrs", f"python3 -c {shlex.quote(probe)}", check=False).stdout.strip() == "401",
        20,
    ), sh("lrs", f"journalctl --no-pager -u {BALANCER_UNIT} | tail -5").stdout
    return ralph[2]


def lrs_url_line() -> str:
    return sh("encodage", f"grep '^XAPI_LRS_URL=' {WORKER_ENV}").stdout.strip()


def point_worker_at(url_line: str) -> None:
    """The worker's LRS URL in its settings (the line as a whole), then a restart."""
    sh(
        "encodage",
        f"sed -i {shlex.quote(f's|^XAPI_LRS_URL=.*|{url_line}|')} {WORKER_ENV} "
        "&& systemctl restart celeryd-xapi.service",
    )
    assert wait_until(lambda: service_active("encodage", WORKER), 60)


def worker_log_since(stamp: float) -> str:
    return sh(
        "encodage", f"journalctl --no-pager -o cat -u 'celeryd-xapi@*' --since @{int(stamp)}"
    ).stdout


def test_the_spool_drains_through_a_broken_backend_and_a_far_retry_after(report_path) -> None:
    began = time.monotonic()
    retry_max = worker_setting("XAPI_WORKER_RETRY_MAX_SECONDS")
    isolate_after = worker_setting("XAPI_WORKER_ISOLATE_AFTER")
    batch = int(worker_setting("XAPI_WORKER_BATCH_SIZE"))
    cap = retry_after_cap()
    plan = [statement(n) for n in range(VALID + VALID // INVALID_EVERY)]
    valid = {s["id"] for s, ok in plan if ok}
    invalid_ids = {s["id"] for s, ok in plan if not ok}
    everything = valid | invalid_ids
    # After the restart every row is due; a batch fails at most ISOLATE_AFTER times whole
    # (each retry within the longest retry delay) before it is split, and a split of 100
    # statements through every other POST failing takes about 2 log2(100) POSTs, a second
    # each at most here: per batch, a drainer's turn bounded by that, batches one by one,
    # and a minute for the restart and the spool's state (published every 5 s).
    batches = math.ceil(len(everything) / batch)
    bound = batches * (isolate_after * retry_max + 2 * math.log2(batch)) + 60
    assert bound < cap, "the bound would not tell a drain that waited the capped hour"

    old_url = lrs_url_line()
    port = start_balancer()
    new_url = old_url.replace(f":{port}/", f":{BALANCER_PORT}/")
    assert new_url != old_url, old_url
    try:
        # Ralph away (the balancer answers 502), its store emptied for when it comes back.
        sh("lrs", f"systemctl stop ralph-lrs && rm -f {LRS_STORE}/* {HISTORY}")
        point_worker_at(new_url)
        spooled_before = broker_state("spool")["depth"]
        with tempfile.TemporaryDirectory() as tmp:
            plan_file = Path(tmp) / "balancer-plan.json"
            plan_file.write_text(json.dumps([s for s, _ in plan]))
            sh("frontal", f"install -d -o pod -g pod -m 0750 {WORK}")
            for source in (plan_file, FILES / "producer.py", FILES / "broker_state.py"):
                copy_to("frontal", source, f"{WORK}/{source.name}")
        sh("frontal", f"rm -f {PROGRESS} && chown -R pod:pod {WORK}")
        sh(
            "frontal",
            pod_python(f"{WORK}/producer.py", f"{WORK}/balancer-plan.json", PROGRESS, f"{RATE:g}"),
            timeout=120,
        )
        assert len(produced(PROGRESS)) == len(everything)

        def all_spooled() -> bool:
            state = broker_state()
            waiting = state["queue"] or state["unacked"] or state["in_flight"]
            return not waiting and state["spooled"] - spooled_before >= len(everything)

        assert wait_until(all_spooled, 120, 2), f"not all spooled: {broker_state()}"
        spooled_at = time.monotonic()

        # Ralph back behind the broken backend; FAR_AFTER POSTs later, a far Retry-After.
        far_from = time.time()
        set_mode(f"balancer {FAR_AFTER}" if FAR else "balancer")
        sh("lrs", "systemctl start ralph-lrs")
        restarted = time.monotonic()
        waits: list[float] = []
        held: list[float] = []
        stored_before_far = far_posts = 0
        if FAR:
            assert wait_until(lambda: balancer_counts().get("far", 0) > 0, 120, 1), (
                balancer_counts()
            )
            assert wait_until(lambda: "Retry-After" in worker_log_since(far_from), 30)
            waits = [
                float(w)
                for w in re.findall(r"LRS asked to wait (\d+) s", worker_log_since(far_from))
            ]
            stored_before_far = len(lrs_store_ids())

            def parked() -> list[float]:
                return [row["next_attempt_in_s"] for row in worker_cli("spool", "list")]

            # Every row left is parked for the capped wait: held, nothing more sent.
            assert wait_until(lambda: min(parked(), default=0) > retry_max, 60, 2), parked()[:5]
            held = parked()
            far_posts = balancer_counts().get("far", 0)

            # The balancer back (the broken backend still there); the worker restarted: the
            # rows parked beyond its longest retry delay are due at start.
            set_mode("balancer")
            restarted = time.monotonic()
            sh("encodage", "systemctl restart celeryd-xapi.service")
            assert wait_until(lambda: service_active("encodage", WORKER), 60)

        def settled() -> bool:
            state = broker_state()
            waiting = state["queue"] or state["unacked"] or state["in_flight"] or state["spooled"]
            return not waiting and everything <= set(lrs_store_ids()) | set(all_dead_letters(state))

        drained = wait_until(settled, bound, 3)
        drain_took = time.monotonic() - restarted
        counts = balancer_counts()
    finally:
        set_mode("pass")
        sh("lrs", "systemctl start ralph-lrs")
        point_worker_at(old_url)
        sh("lrs", f"systemctl stop {BALANCER_UNIT}", check=False)

    stored = lrs_store_ids()
    state = broker_state()
    dead = all_dead_letters(state)  # the broker's list and the worker's disk
    lost = everything - set(stored) - set(dead)
    report = "\n".join(
        [
            f"{len(everything)} statements ({len(valid)} valid, {len(invalid_ids)} invalid) "
            "spooled while Ralph was away, then drained through a balancer with one broken "
            "backend (every other POST a 503 HTML page), a far Retry-After on the way.",
            "",
            "| spool drain, broken backend, far Retry-After | statements | stored "
            "| dead-lettered | lost |",
            "|---|---:|---:|---:|---:|",
            f"| valid | {len(valid)} | {len(valid & set(stored))} | {len(valid & set(dead))} "
            f"| {len(valid - set(stored) - set(dead))} |",
            f"| invalid | {len(invalid_ids)} | {len(invalid_ids & set(stored))} "
            f"| {len(invalid_ids & set(dead))} | {len(invalid_ids - set(stored) - set(dead))} |",
            "",
            (
                f"- Retry-After two years ahead after {FAR_AFTER} POSTs ({stored_before_far} "
                f"stored by then): the worker waited {sorted(set(waits))} s (cap {cap:.0f} s), "
                f"{len(held)} rows parked {min(held):.0f}-{max(held):.0f} s ahead, "
                f"{far_posts} POSTs answered with it; the worker restarted"
                if FAR and held
                else "- no far Retry-After (XAPI_RES_FAR_RETRY_AFTER=0)"
            ),
            f"- then the spool drained in {drain_took:.0f} s (bound {bound:.0f} s from the "
            f"retry timers); POSTs by answer: {counts}",
            f"- at the end: {state['queue']} queued, {state['unacked']} unacknowledged, "
            f"{state['in_flight']} in flight, {state['spooled']} spooled",
            f"- the test took {time.monotonic() - began:.0f} s "
            f"(the spool filled {spooled_at - began:.0f} s after its start)",
        ]
    )
    print("\n" + report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    (report_path.parent / "balancer-report.md").write_text(report + "\n")

    assert not valid & set(dead), [(i, dead[i]["reason"]) for i in sorted(valid & set(dead))[:5]]
    assert not lost, f"{len(lost)} statements neither stored nor dead-lettered"
    assert drained, f"the drain did not end within {bound:.0f} s: {state}"
    duplicates = {i: n for i, n in stored.items() if n > 1 and i in everything}
    assert not duplicates, f"stored more than once: {list(duplicates.items())[:5]}"
    assert not invalid_ids & set(stored)
    for statement_id in invalid_ids:
        entry = dead[statement_id]
        assert entry["status"] in (400, 422) and "rejected by the LRS" in entry["reason"], entry
    if FAR:
        assert waits and max(waits) <= cap, f"the far Retry-After was not capped: {waits}"
        assert retry_max < min(held) and max(held) <= cap, (min(held), max(held))
    assert counts.get("broken", 0) > 0, counts
    assert (state["queue"], state["unacked"], state["in_flight"], state["spooled"]) == (0,) * 4
