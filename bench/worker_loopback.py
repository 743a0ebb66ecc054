"""Loopback benchmark of the xAPI worker: redis-server + Ralph (FS backend) + one worker, all on
127.0.0.1. N statements are queued first (as Pod's frontal would, with ``.delay()``), then a
worker is started and timed until the LRS holds all of them. Run from the repository root:

    RALPH_VENV=$PWD/.venv-ralph PYTHONPATH=testsupport:xapi_worker/tests \
        .venv-worker/bin/python bench/worker_loopback.py [N [SIZES]]
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

# The worker tests' processes and Pod-like producer (xapi_worker/tests), and the shared
# helpers (testsupport): both on PYTHONPATH, see the docstring.
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


def logged_batches(log: str) -> list[int]:
    """Sizes of the POSTs the worker logged ("delivered batch: N statements, ...")."""
    return [int(m) for m in re.findall(r"delivered batch: (\d+) statements", log)]


def run(n: int, batch_size: int, auth: Path) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis = RedisServer(work)
        ralph = Ralph(work, auth)
        worker = None
        try:
            config = local_worker_config(
                work / "worker.env",
                redis.url(),
                ralph.url,
                XAPI_WORKER_BATCH_SIZE=batch_size,
                XAPI_WORKER_FLUSH_INTERVAL_MS=500,
            )
            verbs = ["initialized", "played", "paused", "seeked", "completed", "terminated"]
            with pod_producer(redis.url()) as delay:
                for i in range(n):
                    delay(video_statement(verbs[i % len(verbs)], i))
            worker = Worker(work, config, f"bench{batch_size}")
            started = time.monotonic()

            def count() -> int:
                return sum(
                    1
                    for p in ralph.data.glob("*.jsonl")
                    for line in p.read_text().splitlines()
                    if line
                )

            if not wait_until(lambda: count() >= n, 900, interval=0.05):
                raise SystemExit(f"only {count()} of {n} delivered:\n{worker.text()[-2000:]}")
            elapsed = time.monotonic() - started
            # Ralph stores before it answers, so the worker logs the last POST a moment after
            # the LRS holds everything: wait for the log to account for all n.
            wait_until(lambda: sum(logged_batches(worker.text())) >= n, 30, interval=0.05)
            return elapsed, len(logged_batches(worker.text()))
        finally:
            if worker is not None:
                worker.stop()
            ralph.stop()
            redis.stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    # optional: the batch sizes to measure, comma-separated (default 1,100)
    sizes = [int(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 100]
    with tempfile.TemporaryDirectory() as tmp:
        auth = make_ralph_auth(Path(tmp))
        rows = [(size, *run(n, size, auth)) for size in sizes]
    print(f"N = {n} statements, 1 worker (--concurrency 1), loopback, Ralph FS backend")
    print(f"{'batch size':>10} | {'seconds':>8} | {'statements/s':>12} | {'POSTs':>6}")
    print(f"{'-' * 10}-+-{'-' * 8}-+-{'-' * 12}-+-{'-' * 6}")
    for size, elapsed, posts in rows:
        print(f"{size:>10} | {elapsed:>8.2f} | {n / elapsed:>12.0f} | {posts:>6}")


if __name__ == "__main__":
    main()
