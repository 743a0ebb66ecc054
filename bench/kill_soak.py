"""SIGKILL soak of the worker: how many statements does each transport lose when the worker is
killed again and again mid-stream? redis-server + Ralph (FS backend) + the worker, on 127.0.0.1.

A producer built like Pod's streams statements with known ids the whole time; the worker (node
``soak@host``, restarted under the same name as systemd would) is SIGKILLed ``--kills`` times at
random instants, while it is taking messages. Then one last worker drains everything, and the
ids in Ralph are compared with the ids sent. Run from the repository root:

    RALPH_VENV=$PWD/.venv-ralph PYTHONPATH=testsupport:xapi_worker/tests \
        .venv-worker/bin/python bench/kill_soak.py --kills 30
    ... --transport kombu     # kombu's own Redis transport, for comparison

Prints one JSON line: kills, sent, stored (unique), duplicates, lost, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter
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

# An app module that swaps the bundled transport for kombu's own, for the comparison run.
KOMBU_APP = """
from xapi_worker.app import app
app.conf.broker_transport = None
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--transport", choices=("xapi", "kombu"), default="xapi")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=150, help="statements/s sent, at most")
    parser.add_argument("--window", type=float, default=0.3, help="kill within N s of ready")
    args = parser.parse_args()
    rng = random.Random(args.seed)  # noqa: S311  (kill instants, not secrets)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "auth").mkdir()
        auth = make_ralph_auth(work / "auth")
        redis = RedisServer(work)
        ralph = Ralph(work, auth)
        config = local_worker_config(
            work / "worker.env",
            redis.url(),
            ralph.url,
            XAPI_WORKER_BATCH_SIZE=100,
            XAPI_WORKER_FLUSH_INTERVAL_MS=100,
            XAPI_WORKER_RETRY_BASE_SECONDS=0.2,
            XAPI_WORKER_RETRY_MAX_SECONDS=1,
            XAPI_WORKER_READ_TIMEOUT=3,
            XAPI_WORKER_CONNECT_TIMEOUT=1,
            XAPI_WORKER_VISIBILITY_TIMEOUT=8,
        )
        if args.transport == "kombu":
            (work / "kombu_app.py").write_text(KOMBU_APP)
            os.environ["PYTHONPATH"] = str(work)  # the workers import kombu_app from there
        sent: list[str] = []
        stop = threading.Event()

        def produce() -> None:
            with pod_producer(redis.url()) as delay:
                n = 0
                while not stop.is_set():
                    statement = video_statement("played", n)
                    delay(statement)
                    sent.append(statement["id"])
                    n += 1
                    time.sleep(1 / args.rate)

        producer = threading.Thread(target=produce)
        producer.start()
        app = "kombu_app" if args.transport == "kombu" else "xapi_worker.app"
        try:
            for kill in range(args.kills):
                # A log directory per start: Worker waits for " ready." in its log.
                (work / f"start{kill}").mkdir()
                worker = Worker(work / f"start{kill}", config, "soak", app=app)
                # Right after "ready" the worker takes its prefetch back to back: most takes,
                # and so most chances to die between a take and its record, are there.
                time.sleep(rng.uniform(0, args.window))
                worker.kill()
            stop.set()
            producer.join()
            time.sleep(9)  # past the visibility timeout: the last start restores every unacked
            worker = Worker(work, config, "soak", app=app)
            total = len(sent)
            progress = {"stored": 0, "at": time.monotonic()}

            def settled() -> bool:
                stored = len(set(ralph.stored_ids()))
                if stored > progress["stored"]:
                    progress.update(stored=stored, at=time.monotonic())
                return stored >= total or time.monotonic() - progress["at"] > 120

            wait_until(settled, 3600, 2)  # done, or two minutes without progress
            time.sleep(12)  # past the visibility timeout: late redeliveries would show
            ids = ralph.stored_ids()
            worker.stop()
        finally:
            stop.set()
            ralph.stop()
            redis.stop()
        counts = Counter(ids)
        result = {
            "transport": args.transport,
            "kills": args.kills,
            "sent": len(sent),
            "stored": len(counts),
            "duplicates": sum(1 for c in counts.values() if c > 1),
            "lost": len(set(sent) - set(counts)),
            "seconds": round(time.monotonic() - started),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
