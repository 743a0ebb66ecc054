"""The worker's start on a large spool, with a cold cache (issue #33, item 8): how long from
the start of `celery worker` until Celery's loop runs (its " ready." line), with a spool of
--size-mib MiB of Pod-like statements, after the page cache was dropped
(`echo 3 > /proc/sys/vm/drop_caches`, root). The goal: at most 10 s at 1 GiB, inside the
unit's WatchdogSec=60 (it counts from the start with Type=exec).

Each variant is a directory holding the `xapi_worker` package, put first on the path; its
own code builds its spool (a file of its own format), in a directory on disk (--dir, not a
tmpfs: the point is the disk's reads). The broker is a redis-server on 127.0.0.1; the LRS is
an address where nothing answers (the drainer's first POSTs fail at once; the start is what
is timed). Also timed, in a process of its own after the cache is dropped again: the
spool's open and first stats, what the worker runs before Celery's loop.

    PYTHONPATH=testsupport:xapi_worker/tests .venv-worker/bin/python bench/spool_start.py \\
        --size-mib 1024 before=<checkout>/xapi_worker/src now=xapi_worker/src
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

NODE = "bench"
ROWS_PER_ADD = 2000


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def build(directory: Path, node: str, size_mib: int) -> tuple[int, float]:
    """A spool of about size_mib MiB, by the variant's own Spool. Returns (rows, seconds)."""
    from xapi_testsupport.statements import video_statement
    from xapi_worker.spool import Entry, Spool

    spool = Spool(directory, node, max_bytes=2 * size_mib * 1024**2)
    spool.open()
    started = time.monotonic()
    now = time.time()
    rows = 0
    target = size_mib * 1024**2
    path = spool.path
    while path.stat().st_size + _wal(path) < target:
        spool.add(
            [
                Entry(video_statement("played", rows + i), f"t{rows + i}", 2, now - 60, now + 3600)
                for i in range(ROWS_PER_ADD)
            ]
        )
        rows += ROWS_PER_ADD
    spool.close()
    return rows, time.monotonic() - started


def _wal(path: Path) -> int:
    try:
        return Path(f"{path}-wal").stat().st_size
    except OSError:
        return 0


def timed_open(directory: Path, node: str) -> float:
    """In this (fresh) process: the spool's open and first stats, as the worker's start."""
    from xapi_worker.spool import Spool

    started = time.monotonic()
    spool = Spool(directory, node)
    spool.open()
    spool.stats()
    spool.close()
    return time.monotonic() - started


def one_run(size_mib: int, base: Path) -> dict[str, object]:
    """Runs in a child process whose path starts with the variant's tree."""
    import socket

    from support import RedisServer, Worker, local_worker_config

    with tempfile.TemporaryDirectory(dir=base) as tmp:
        work = Path(tmp)
        spool_dir = work / "spool"
        spool_dir.mkdir(mode=0o700)
        node = f"{NODE}@{socket.gethostname()}"
        rows, build_s = build(spool_dir, node, size_mib)
        size = sum(p.stat().st_size for p in spool_dir.iterdir())
        cold = drop_caches()
        opened = subprocess.run(
            [sys.executable, __file__, "--open", str(spool_dir), "--node", node],
            capture_output=True,
            text=True,
            check=True,
        )
        open_s = float(opened.stdout)
        redis = RedisServer(work)
        try:
            config = local_worker_config(
                work / "worker.env",
                redis.url(),
                "http://127.0.0.1:9/xAPI/statements/",
                XAPI_WORKER_SPOOL_DIR=spool_dir,
            )
            drop_caches()
            started = time.monotonic()
            worker = Worker(work, config, NODE, wait_ready=False)
            ready = None
            while time.monotonic() - started < 600:
                if " ready." in worker.text():
                    ready = time.monotonic() - started
                    break
                if worker.proc.poll() is not None:
                    break
                time.sleep(0.05)
            log = worker.text()
            worker.stop()
        finally:
            redis.stop()
    return {
        "rows": rows,
        "mib": round(size / 1024**2),
        "build_s": round(build_s, 1),
        "cold": cold,
        "open_s": round(open_s, 2),
        "ready_s": None if ready is None else round(ready, 2),
        "set_aside": "set aside as" in log,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    # /var/tmp: on the disk (/tmp may be a tmpfs); a private directory is made inside it
    parser.add_argument("--dir", default="/var/tmp", help="where the spools are built (a disk)")  # noqa: S108
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--open", help=argparse.SUPPRESS)  # internal: time an open
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("variants", nargs="*", help="label=directory of xapi_worker")
    args = parser.parse_args()
    if args.open:
        print(timed_open(Path(args.open), args.node))
        return
    if args.one:
        print(json.dumps(one_run(args.size_mib, Path(args.dir))))
        return
    if not drop_caches():
        print("cannot drop the page cache (not root?): the figures are not cold", file=sys.stderr)
    variants = [v.split("=", 1) for v in args.variants] or [["now", "xapi_worker/src"]]
    print("| variant | round | rows | MiB | cold | open + stats s | start to ready s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for round_no in range(1, args.rounds + 1):
        for label, tree in variants:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(tree).resolve()), env.get("PYTHONPATH", "")]
            )
            out = subprocess.run(
                [
                    *(sys.executable, __file__, "--one"),
                    *("--size-mib", str(args.size_mib), "--dir", args.dir),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"variant {label} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ready = "never" if r["ready_s"] is None else r["ready_s"]
            aside = " (set aside!)" if r["set_aside"] else ""
            print(
                f"| {label} | {round_no} | {r['rows']} | {r['mib']} | {r['cold']} | "
                f"{r['open_s']} | {ready}{aside} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
