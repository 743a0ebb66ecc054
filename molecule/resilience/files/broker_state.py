"""The broker's side of the accounting, read on the frontal as user pod with Pod's venv and
the broker URL of Pod's settings_local.py (so no password is passed to it).

    python broker_state.py              JSON: messages waiting in queue `xapi`, messages
                                        delivered to a worker but unacknowledged, taken
                                        but not yet recorded (the workers' in-flight
                                        lists), dead letters (id, reason, status)
    python broker_state.py wait-unacked SECONDS
                                        returns as soon as a worker holds unacknowledged
                                        messages (to strike it mid-batch); prints how many
"""

from __future__ import annotations

import json
import sys
import time

import redis
from pod.custom import settings_local

DEAD_LETTERS = "xapi.dead_letters"

client = redis.Redis.from_url(settings_local.XAPI_CELERY_BROKER_URL, socket_timeout=10)

if sys.argv[1:2] == ["wait-unacked"]:
    deadline = time.monotonic() + float(sys.argv[2])
    held = 0
    while time.monotonic() < deadline and not held:
        held = client.hlen("unacked")
        time.sleep(0.01)
    print(held)
    sys.exit(0)

dead = []
for raw in client.lrange(DEAD_LETTERS, 0, -1):
    entry = json.loads(raw)
    statement = entry.get("statement") or {}
    dead.append(
        {"id": statement.get("id"), "reason": entry.get("reason"), "status": entry.get("status")}
    )
# The worker's transport: messages a node has taken and not yet recorded in unacked.
in_flight = sum(client.llen(key) for key in client.smembers("xapi.inflight"))
print(
    json.dumps(
        {
            "queue": client.llen("xapi"),
            "unacked": client.hlen("unacked"),
            "in_flight": in_flight,
            "dead": dead,
        }
    )
)
