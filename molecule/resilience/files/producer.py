"""Streams a known set of statements into queue `xapi` with Pod's own producer.

Runs on the frontal as user pod, in Pod's venv, like Pod's views: each statement goes through
``pod.xapi.xapi_tasks.send_xapi_statement_task.delay``. A statement counts as enqueued once
``delay()`` has returned; when the broker refuses (Redis restarting), the call is repeated, as
a user's next page view would, and the refusal is counted.

    python producer.py PLAN.json PROGRESS.tsv RATE_PER_SECOND
    python producer.py PLAN.json PROGRESS.tsv RATE_FILE

With a RATE_FILE (a file holding the rate), the rate is read again every half second, so a
test can slow the stream down around a fault and speed it up again.

PROGRESS gets one line per enqueued statement: epoch seconds, id, refused attempts.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pod.xapi.xapi_tasks import send_xapi_statement_task

REREAD_SECONDS = 0.5


def rate_source(argument: str) -> Callable[[], float]:
    try:
        fixed = float(argument)
    except ValueError:
        rate_file = Path(argument)
        return lambda: float(rate_file.read_text(encoding="utf-8"))
    return lambda: fixed


def main(plan_path: str, progress_path: str, rate_argument: str) -> int:
    with open(plan_path, encoding="utf-8") as plan_file:
        statements = json.load(plan_file)
    read_rate = rate_source(rate_argument)
    rate = read_rate()
    # Paced against the last change of rate, so time lost to a refused publish is caught up.
    paced_from, paced_n = time.monotonic(), 0
    read_at = paced_from
    with open(progress_path, "a", encoding="utf-8") as progress:
        for n, statement in enumerate(statements):
            if time.monotonic() - read_at >= REREAD_SECONDS:
                read_at = time.monotonic()
                new_rate = read_rate()
                if new_rate != rate:
                    rate, paced_from, paced_n = new_rate, read_at, n
            time.sleep(max(0.0, paced_from + (n - paced_n) / rate - time.monotonic()))
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
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
