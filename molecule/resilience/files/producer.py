"""Streams a known set of statements into queue `xapi` with Pod's own producer.

Runs on the frontal as user pod, in Pod's venv, like Pod's views: each statement goes through
``pod.xapi.xapi_tasks.send_xapi_statement_task.delay``. A statement counts as enqueued once
``delay()`` has returned; when the broker refuses (Redis restarting), the call is repeated, as
a user's next page view would, and the refusal is counted.

    python producer.py PLAN.json PROGRESS.tsv RATE_PER_SECOND

PROGRESS gets one line per enqueued statement: epoch seconds, id, refused attempts.
"""

from __future__ import annotations

import json
import sys
import time

from pod.xapi.xapi_tasks import send_xapi_statement_task


def main(plan_path: str, progress_path: str, rate: float) -> int:
    with open(plan_path, encoding="utf-8") as plan_file:
        statements = json.load(plan_file)
    interval = 1.0 / rate
    start = time.monotonic()
    with open(progress_path, "a", encoding="utf-8") as progress:
        for n, statement in enumerate(statements):
            # Paced against the start, so time lost to a refused publish is caught up.
            time.sleep(max(0.0, start + n * interval - time.monotonic()))
            refused = 0
            while True:
                try:
                    send_xapi_statement_task.delay(statement)
                    break
                except Exception as exc:
                    refused += 1
                    print(f"publish refused ({type(exc).__name__}), retrying", flush=True)
                    time.sleep(0.5)
            progress.write(f"{time.time():.3f}\t{statement['id']}\t{refused}\n")
            progress.flush()
    print(f"produced {len(statements)} statements", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
