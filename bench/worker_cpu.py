"""The worker's CPU per delivered statement on loopback: redis-server, Ralph (FS backend) and
one bundled worker (`--concurrency 1`, batches of 100), all on 127.0.0.1. The statements come
from a Pod-identical `.delay()` producer, either queued before the worker starts
(`--rate 0`, a drain) or at a steady rate while it runs (a live frontal). CPU is utime +
stime of the Celery main process and of its pool process, from /proc, between the worker's
start and the last statement stored, divided by the statements.

Several worker trees can be compared in one run, alternated round after round (each
variant is a directory holding the `xapi_worker` package, put first on the path):

    RALPH_VENV=$PWD/.venv-ralph PYTHONPATH=testsupport:xapi_worker/tests \\
        .venv-worker/bin/python bench/worker_cpu.py --n 4000 --rate 300 --rounds 2 \\
        before=<checkout>/xapi_worker/src now=xapi_worker/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def one_run(n: int, rate: float) -> dict[str, float]:
    """Runs in a child process whose path starts with the variant's tree."""
    from support import (
        Ralph,
        RedisServer,
        Worker,
        local_worker_config,
        make_ralph_auth,
        pod_producer,
    )
    from xapi_testsupport.polling import wait_until
    from xapi_testsupport.statements import video_statement

    tick = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis = RedisServer(work)
        ralph = Ralph(work, make_ralph_auth(work))
        try:
            config = local_worker_config(
                work / "worker.env", redis.url(), ralph.url, XAPI_WORKER_BATCH_SIZE=100
            )
            if not rate:
                with pod_producer(redis.url()) as delay:
                    for i in range(n):
                        delay(video_statement("played", i))
            worker = Worker(work, config, "cpu")
            main = worker.proc.pid
            pool = children(main)
            before = cpu_ticks(main), sum(cpu_ticks(p) for p in pool)
            started = time.monotonic()
            if rate:
                with pod_producer(redis.url()) as delay:
                    for i in range(n):
                        time.sleep(max(0.0, started + i / rate - time.monotonic()))
                        delay(video_statement("played", i))

            def stored() -> int:
                return sum(
                    1 for p in ralph.data.glob("*.jsonl") for line in p.open() if line.strip()
                )

            if not wait_until(lambda: stored() >= n, 600, 0.2):
                raise RuntimeError(f"only {stored()} of {n} stored")
            seconds = time.monotonic() - started
            after = cpu_ticks(main), sum(cpu_ticks(p) for p in pool)
            worker.proc.terminate()
            worker.proc.wait(30)
        finally:
            ralph.stop()
            redis.stop()
    main_ms = (after[0] - before[0]) / tick * 1000 / n
    pool_ms = (after[1] - before[1]) / tick * 1000 / n
    return {"seconds": round(seconds, 2), "main_ms": main_ms, "pool_ms": pool_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=0, help="statements/s; 0: pre-queued")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run of a variant
    parser.add_argument("variants", nargs="*", help="label=directory of xapi_worker")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.n, args.rate)))
        return
    variants = [v.split("=", 1) for v in args.variants] or [["now", "xapi_worker/src"]]
    print(f"rate: {args.rate:g} statements/s (0: queued before the worker starts)")
    print("| variant | round | statements | seconds | main ms | pool ms | total ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for round_no in range(1, args.rounds + 1):
        for label, tree in variants:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(tree).resolve()), env.get("PYTHONPATH", "")]
            )
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    "1",
                    "--n",
                    str(args.n),
                    "--rate",
                    str(args.rate),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            total = r["main_ms"] + r["pool_ms"]
            print(
                f"| {label} | {round_no} | {args.n:,} | {r['seconds']} | {r['main_ms']:.3f} "
                f"| {r['pool_ms']:.3f} | {total:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
