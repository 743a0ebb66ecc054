"""The deployed pipeline benchmark (`make bench`): deployment times, then each
configuration deployed by the bundle and measured end to end, raw results as JSON.

    python bench/pipeline.py [--n 2000] [--phases deploy,b,bdrain,c,a,b2nodes,b2hosts]
                             [--spool-n 20000] (phases spool,cspool)
                             [--before-worker DIR] (phase spoolbefore)
                             [--dead-n 5000] (phase dead)

Run from the repository root with the Makefile's environment (CONTAINERS_CONF,
ANSIBLE_CONFIG, the tools venv on PATH); bench/run.sh does it and renders the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import onhost
import yaml
from labhosts import REPO, PodmanHost, playbook
from xapi_testsupport import statements
from xapi_testsupport.polling import wait_until

PREFIX = "xapi-bench"
SEED_CAP_S = 3 * 3600  # (a) run to the end: about an hour at the seed's rate
HOSTS = "frontal encodage encodage2 lrs"
ONE = "bench/inventory/hosts.yml"
TWO = "bench/inventory/two-encodage.yml"
FRONTAL, LRS = PodmanHost(f"{PREFIX}-frontal"), PodmanHost(f"{PREFIX}-lrs")
ENCODAGE = [PodmanHost(f"{PREFIX}-encodage"), PodmanHost(f"{PREFIX}-encodage2")]
# The lab's broker admin password (MEMORY USAGE of the dead letters' list, phase dead).
GROUP_VARS = REPO / "inventories/lab/group_vars/all/xapi.yml"
# Same size as the bundled worker's default batch (XAPI_WORKER_BATCH_SIZE).
DIRECT_BATCH = 100

# name: (label, playbook, inventory, extra vars file, encoding hosts measured)
CONFIGS: dict[str, tuple[str, str, str, str, int]] = {
    "a": ("(a) seed: Pod's task module", "playbooks/xapi_encodage.yml", ONE, "a-seed", 1),
    "b": ("(b) bundle defaults", "playbooks/xapi_encodage.yml", ONE, "b-defaults", 1),
    "b2nodes": ("(b) 2 nodes, 1 host", "playbooks/xapi_encodage.yml", ONE, "b-2nodes", 1),
    "b2hosts": ("(b) 2 encoding hosts", "site.yml", TWO, "b-defaults", 2),
}


def lab(script: str) -> None:
    env = dict(os.environ, LAB_PREFIX=PREFIX, LAB_HOSTS=HOSTS)
    subprocess.run(["bash", f"lab/{script}"], cwd=REPO, env=env, check=True)


def deployment(logs: Path, facts: Path) -> dict[str, Any]:
    """Fresh hosts, the operator's Pod (lab/prepare.yml, not timed), then site.yml three
    times: first run, second run (must change nothing), --check --diff."""
    lab("down.sh")
    lab("up.sh")
    playbook("prepare", logs, "-i", TWO, "lab/prepare.yml")
    # A control machine that never saw these hosts: the first run gathers its facts.
    shutil.rmtree(facts, ignore_errors=True)
    runs = [
        playbook("site-first", logs, "-i", ONE, "site.yml"),
        playbook("site-second", logs, "-i", ONE, "site.yml"),
        playbook("site-check", logs, "-i", ONE, "site.yml", "--check", "--diff"),
    ]
    return {r.name: vars(r) for r in runs}


class RssSampler(threading.Thread):
    """Peak, over the run, of the summed RSS of the Celery processes of the hosts."""

    def __init__(self, hosts: list[PodmanHost]) -> None:
        super().__init__(daemon=True)
        self.hosts, self.peak_kib, self.done = hosts, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total = sum(onhost.worker_rss_kib(h) for h in self.hosts)
            self.peak_kib = max(self.peak_kib, total)
            self.done.wait(1.0)


def worker_cpu(hosts: list[PodmanHost]) -> dict[str, float]:
    """CPU seconds of the bundled worker's processes so far, summed over the hosts."""
    total = {"main": 0.0, "pool": 0.0}
    for host in hosts:
        used = onhost.worker_cpu(host)
        total["main"] += used["main"]
        total["pool"] += used["pool"]
    return total


def cpu_per_statement(before: dict[str, float], after: dict[str, float], n: int) -> dict:
    """Milliseconds of worker CPU per statement between two readings, main and pool."""
    main = (after["main"] - before["main"]) * 1000 / n
    pool = (after["pool"] - before["pool"]) * 1000 / n
    return {"main": round(main, 3), "pool": round(pool, 3), "total": round(main + pool, 3)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(n: int, hosts: list[PodmanHost], direct: bool, window: float) -> dict[str, Any]:
    """N statements in one burst from the frontal, timed until Ralph stored the last one or
    until `window` seconds passed (then what is left in the queue is dropped, and the
    latencies of the statements not stored count as their wait so far: lower bounds)."""
    if not wait_until(lambda: onhost.queue_length(FRONTAL) == 0, 300, 2):
        raise RuntimeError("the queue does not drain before the run")
    if not direct:  # warm-up: workers connected, then the same empty LRS for every run
        onhost.reset_lrs(LRS)
        onhost.produce(FRONTAL, 10)
        if not wait_until(lambda: onhost.stored_count(LRS) >= 10, 120, 0.5):
            raise RuntimeError("warm-up statements not delivered")
    onhost.reset_lrs(LRS)
    sampler = RssSampler(hosts)
    sampler.start()
    cpu_before = worker_cpu(hosts)
    sent: list[tuple[str, float]] = []

    def send() -> None:
        if direct:
            sent.extend(onhost.direct(FRONTAL, n, DIRECT_BATCH))
        else:
            sent.extend(onhost.produce(FRONTAL, n))

    producer = threading.Thread(target=send)
    begun = time.time()
    producer.start()
    complete = wait_until(lambda: onhost.stored_count(LRS) >= n, window, 0.5)
    ended = time.time()
    producer.join()
    cpu_after = worker_cpu(hosts)
    sampler.done.set()
    sampler.join()
    if not complete:
        onhost.purge_queue(ENCODAGE[0])
    if len(sent) != n:
        raise RuntimeError(f"the producer sent {len(sent)} of {n} statements")
    stored = onhost.stored_times(LRS)
    done = [(i, t) for i, t in sent if i in stored]
    if complete and len(done) != n:
        raise RuntimeError(f"{n - len(done)} statements missing in the LRS")
    latencies = [stored.get(i, ended) - t for i, t in sent]
    first = min(t for _, t in sent)
    elapsed = max(stored[i] for i, _ in done) - first if complete else ended - first
    return {
        "n": n,
        "stored": len(done),
        "complete": complete,
        "seconds": round(elapsed, 2),
        "statements_per_s": round(len(done) / elapsed, 2),
        "enqueue_seconds": round(max(t for _, t in sent) - first, 2),
        "producer_start_delay_s": round(first - begun, 2),
        "latency_p50_ms": round(percentile(latencies, 0.50) * 1000),
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1000),
        "worker_rss_peak_mib": round(sampler.peak_kib / 1024, 1) if hosts else None,
        "worker_cpu_ms": cpu_per_statement(cpu_before, cpu_after, len(done)) if hosts else None,
    }


def stored_span(n: int, sent: list[tuple[str, float]], complete: bool) -> dict[str, float]:
    """Every statement sent is in Ralph's store; the time and rate from the first to the
    last `stored` stamp (no producer in them)."""
    stored = onhost.stored_times(LRS)
    if not complete or any(i not in stored for i, _ in sent):
        raise RuntimeError(f"only {len(stored)} of {n} statements stored")
    first, last = min(stored.values()), max(stored.values())
    return {
        "seconds": round(last - first, 2),
        "statements_per_s": round((n - 1) / (last - first), 2),
    }


def drain(n: int, hosts: list[PodmanHost]) -> dict[str, Any]:
    """The workers alone: N statements queued while they are stopped, then the rate between
    the first and the last statement stored once they start (no producer on the CPUs)."""
    onhost.reset_lrs(LRS)
    onhost.produce(FRONTAL, 10)  # warm-up, as in measure()
    if not wait_until(lambda: onhost.stored_count(LRS) >= 10, 120, 0.5):
        raise RuntimeError("warm-up statements not delivered")
    for host in hosts:
        host.check("systemctl stop celeryd-xapi")
    onhost.reset_lrs(LRS)
    sent = onhost.produce(FRONTAL, n)
    sampler = RssSampler(hosts)
    sampler.start()
    for host in hosts:
        host.check("systemctl start celeryd-xapi")
    # The worker's CPU from its start: its start-up costs are in (a second or so).
    cpu_before = {"main": 0.0, "pool": 0.0}
    complete = wait_until(lambda: onhost.stored_count(LRS) >= n, 3600, 0.5)
    cpu_after = worker_cpu(hosts)
    sampler.done.set()
    sampler.join()
    return {
        "n": n,
        "stored": n,
        "complete": True,
        **stored_span(n, sent, complete),
        "latency_p50_ms": None,
        "latency_p99_ms": None,
        "worker_rss_peak_mib": round(sampler.peak_kib / 1024, 1),
        "worker_cpu_ms": cpu_per_statement(cpu_before, cpu_after, n),
    }


def spool(n: int, host: PodmanHost) -> dict[str, Any]:
    """The spool (issue #17): Ralph stopped, N statements queued by Pod's producer in one
    burst; the worker takes them from Redis into its spool (the live path while the LRS is
    away). Then Ralph comes back with an empty store and the spool drains, oldest first in
    batches: rate between the first and the last `stored` stamp, as (c) on a store of the
    same size (phase cspool). Worker CPU per statement for each half."""
    onhost.reset_lrs(LRS)
    onhost.produce(FRONTAL, 10)  # warm-up, as in measure()
    if not wait_until(lambda: onhost.stored_count(LRS) >= 10, 120, 0.5):
        raise RuntimeError("warm-up statements not delivered")
    before = onhost.spool_depth(host)
    if before:
        raise RuntimeError(f"the spool holds {before} statements before the run")
    onhost.stop_lrs(LRS)
    sampler = RssSampler([host])
    sampler.start()
    cpu_start = worker_cpu([host])
    began = time.time()
    sent = onhost.produce(FRONTAL, n)

    def spooled() -> bool:
        return onhost.queue_length(FRONTAL) == 0 and onhost.spool_depth(host) >= n

    if not wait_until(spooled, 3600, 2):
        raise RuntimeError(f"only {onhost.spool_depth(host)} of {n} statements spooled")
    in_spool = time.time() - began
    cpu_spooled = worker_cpu([host])
    onhost.start_lrs(LRS)
    complete = wait_until(lambda: onhost.stored_count(LRS) >= n, 3600, 1)
    cpu_drained = worker_cpu([host])
    sampler.done.set()
    sampler.join()
    return {
        "n": n,
        "stored": n,
        "complete": True,
        **stored_span(n, sent, complete),
        "spooled_seconds": round(in_spool, 2),
        "latency_p50_ms": None,
        "latency_p99_ms": None,
        "worker_rss_peak_mib": round(sampler.peak_kib / 1024, 1),
        "worker_cpu_ms": cpu_per_statement(cpu_spooled, cpu_drained, n),
        "worker_cpu_spooling_ms": cpu_per_statement(cpu_start, cpu_spooled, n),
    }


def dead_letters(n: int, host: PodmanHost) -> dict[str, Any]:
    """The dead letters on the node's disk against the broker's list (bench/dead_letters.py,
    run on the encoding host as the worker's user, with its settings and the frontal's
    broker; the broker's admin password in a file of that user's, never in argv). The
    workers are stopped meanwhile (a node with a spool moves the broker's list to its disk),
    and started again."""
    admin = yaml.safe_load(GROUP_VARS.read_text())["xapi_broker_admin_password"]
    for encodage in ENCODAGE:
        encodage.run("systemctl stop celeryd-xapi 2>/dev/null || true")
    work = "/opt/xapi-bench"  # root-owned, readable by the worker's user
    host.check(f"rm -rf {work} && mkdir -m 755 {work}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp)
            statement = statements.video_statement("played", 7)
            (files / "statement.json").write_text(json.dumps(statement))
            secret = files / "admin-password"
            secret.touch(mode=0o600)
            secret.write_text(admin)
            for source in (REPO / "bench/dead_letters.py", *files.iterdir()):
                subprocess.run(
                    ["podman", "cp", str(source), f"{host.container}:{work}/{source.name}"],
                    check=True,
                )
        host.check(
            f"chmod 644 {work}/* && chown xapi-worker {work}/admin-password "
            f"&& chmod 600 {work}/admin-password"
        )
        out = host.check(
            f"cd {work} && runuser -u xapi-worker -- env "
            "XAPI_WORKER_CONFIG=/etc/celeryd-xapi/worker.env "
            f"BENCH_REDIS_ADMIN_PASSWORD_FILE={work}/admin-password "
            f"/opt/xapi-worker/bin/python dead_letters.py --n {n} --statement statement.json"
        )
    finally:
        host.check(f"rm -rf {work}")
        host.check("systemctl start celeryd-xapi")
    return json.loads(out.splitlines()[-1])


def direct_rate(n: int) -> dict[str, Any]:
    """(c) on N statements, its rate between the first and the last `stored` stamp: the
    measure spool() uses, on a store growing to the same size."""
    row = measure(n, [], direct=True, window=3600)
    return {**row, **stored_span(n, [], True)}


def git_rev(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or tree.name


def spool_before(spool_n: int, logs: Path, tree: Path) -> dict[str, Any]:
    """Phase spool with the worker of an earlier checkout (its xapi_worker tree), for a
    side-by-side comparison in the same run; (b) is deployed again afterwards, so that a
    later phase spool measures the current worker."""
    rev = git_rev(tree)
    _, book, inventory, extra, _ = CONFIGS["b"]
    deploy = ("-i", inventory, book, "-e", f"@bench/configs/{extra}.yml")
    run = playbook("deploy-spoolbefore", logs, *deploy, "-e", f"xapi_encodage_worker_source={tree}")
    print(f"bench: worker of {rev} deployed in {run.seconds} s", flush=True)
    try:
        row = spool(spool_n, ENCODAGE[0])
    finally:
        playbook("deploy-spoolbefore-back", logs, *deploy)
    return {"config": "spoolbefore", "label": f"(b) spool drain, worker of {rev}", **row}


def run_config(
    name: str,
    n: int,
    logs: Path,
    window: float,
    spool_n: int,
    before: Path | None = None,
    dead_n: int = 5000,
) -> dict[str, Any]:
    if name == "spoolbefore":
        if before is None:
            raise SystemExit("phase spoolbefore needs --before-worker DIR")
        print(f"bench: (b) spool drain with the worker of {before}, N={spool_n}", flush=True)
        ENCODAGE[1].run("systemctl stop celeryd-xapi 2>/dev/null || true")
        return spool_before(spool_n, logs, before)
    if name == "spool":  # on the deployment of (b), spool on (the defaults)
        print(f"bench: (b) spool, LRS away then back, N={spool_n}", flush=True)
        ENCODAGE[1].run("systemctl stop celeryd-xapi 2>/dev/null || true")
        row = spool(spool_n, ENCODAGE[0])
        return {"config": "spool", "label": "(b) spool drain, LRS back", **row}
    if name == "dead":  # on the deployment of (b), spool on (the defaults)
        print(f"bench: dead letters, the node's disk and the broker's list, N={dead_n}", flush=True)
        started = time.monotonic()
        row = dead_letters(dead_n, ENCODAGE[0])
        took = round(time.monotonic() - started)
        return {"config": "dead", "label": "dead letters", "phase_seconds": took, **row}
    if name == "cspool":
        print(f"bench: (c) direct batched ingest, N={spool_n}", flush=True)
        row = direct_rate(spool_n)
        return {"config": "cspool", "label": "(c) Ralph direct, same store size", **row}
    if name == "c":
        print(f"bench: (c) direct batched ingest, N={n}", flush=True)
        row = measure(n, [], direct=True, window=window)
        return {"config": "c", "label": "(c) Ralph direct, batches of 100", **row}
    if name == "bdrain":  # a diagnostic of (b): run after it, same deployment
        print(f"bench: (b) workers alone, N={n}", flush=True)
        ENCODAGE[1].run("systemctl stop celeryd-xapi 2>/dev/null || true")
        row = drain(n, ENCODAGE[:1])
        return {"config": "bdrain", "label": "(b) workers alone, pre-queued", **row}
    label, book, inventory, extra, hosts = CONFIGS[name]
    run = playbook(
        f"deploy-{name}", logs, "-i", inventory, book, "-e", f"@bench/configs/{extra}.yml"
    )
    print(f"bench: {label} deployed in {run.seconds} s, N={n}", flush=True)
    # A worker left on the second host by an earlier 2-host run would share the queue.
    for spare in ENCODAGE[hosts:]:
        spare.run("systemctl stop celeryd-xapi 2>/dev/null || true")
    row = measure(n, ENCODAGE[:hosts], direct=False, window=window)
    return {"config": name, "label": label, "deploy_seconds": run.seconds, **row}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln)
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "nproc": os.cpu_count(),
        "ram_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024 / 1024, 1),
        "cpu": model,
        "os": Path("/etc/debian_version").read_text().strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--phases", default="deploy,b,bdrain,spool,cspool,dead,c,a,b2nodes,b2hosts")
    parser.add_argument("--out", default="bench/results")
    # The spool's size in phases spool and cspool (issue #17 asks for 20,000).
    parser.add_argument("--spool-n", type=int, default=20000)
    # Phase dead: dead letters written, listed, replayed and purged in each place.
    parser.add_argument("--dead-n", type=int, default=5000)
    # Phase spoolbefore: the xapi_worker directory of an earlier checkout (git worktree).
    parser.add_argument("--before-worker", type=Path)
    # The seed configuration delivers about one statement every two seconds, so its full run
    # of 2,000 takes about an hour. 0 (default): run it to the end (capped at 3 h); a number
    # of seconds time-boxes it for a quicker bench. The other configurations get an hour.
    parser.add_argument("--seed-window", type=float, default=0)
    args = parser.parse_args()
    seed_window = args.seed_window or SEED_CAP_S
    out = REPO / args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    facts = Path(os.environ["ANSIBLE_CACHE_PLUGIN_CONNECTION"])
    started = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": os.environ.get("BENCH_COMMAND", "make bench"),
        "machine": machine(),
        "n": args.n,
        "direct_batch": DIRECT_BATCH,
        "seed_window_s": seed_window,  # what report.py prints if (a) did not finish
        "deployment": None,
        "runs": [],
    }
    for phase in args.phases.split(","):
        if phase == "deploy":
            result["deployment"] = deployment(logs, facts)
            print(f"bench: deployment {result['deployment']}", flush=True)
        else:
            window = seed_window if phase == "a" else 3600
            row = run_config(
                phase, args.n, logs, window, args.spool_n, args.before_worker, args.dead_n
            )
            result["runs"].append(row)
            print(f"bench: {result['runs'][-1]}", flush=True)
        (out / "running.json").write_text(json.dumps(result, indent=2) + "\n")
    result["total_seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds())
    text = json.dumps(result, indent=2) + "\n"
    (out / f"bench-{started:%Y%m%dT%H%M%SZ}.json").write_text(text)
    # latest.json is the run behind the pipeline's table: only a run with its reference, (c),
    # replaces it (report.py rewrites that table on the same condition).
    if "c" in args.phases.split(","):
        (out / "latest.json").write_text(text)
    (out / "running.json").unlink()


if __name__ == "__main__":
    main()
