"""The broker's side of the accounting, read on the frontal as user pod with Pod's venv.

It reads what only the worker's broker user may read (unacked, the in-flight lists, the dead
letters): Pod's settings_local.py names the producer's user, which is refused all of it
(roles/xapi_broker README). The worker's broker URL comes on stdin (never argv: `ps`), as the
tests build it from the lab's settings (hosts.worker_broker_url).

    python broker_state.py              JSON: messages waiting in queue `xapi`, messages
                                        delivered to a worker but unacknowledged, taken
                                        but not yet recorded (the workers' in-flight
                                        lists), statements in the nodes' spools (the
                                        state each node publishes), dead letters (id,
                                        reason, status)
    python broker_state.py spool        JSON: the nodes' spools summed, depth and bytes
    python broker_state.py wait-unacked SECONDS
                                        returns as soon as a worker holds unacknowledged
                                        messages (to strike it mid-batch); prints how many
"""

from __future__ import annotations

import json
import sys
import time

import redis

DEAD_LETTERS = "xapi.dead_letters"

client = redis.Redis.from_url(sys.stdin.readline().strip(), socket_timeout=10)

if sys.argv[1:2] == ["wait-unacked"]:
    deadline = time.monotonic() + float(sys.argv[2])
    held = 0
    while time.monotonic() < deadline and not held:
        held = client.hlen("unacked")
        time.sleep(0.01)
    print(held)
    sys.exit(0)

# The worker's transport: the nodes' in-flight lists, and beside each the hash where that node
# publishes its spool's state (xapi_worker names.spool_state_key).
inflight_lists = sorted(k.decode() for k in client.smembers("xapi.inflight"))


def spool_sum(field: str) -> int:
    return sum(int(client.hget(key + ".spool", field) or 0) for key in inflight_lists)


if sys.argv[1:2] == ["spool"]:
    print(json.dumps({"depth": spool_sum("depth"), "bytes": spool_sum("bytes")}))
    sys.exit(0)

dead = []
for raw in client.lrange(DEAD_LETTERS, 0, -1):
    entry = json.loads(raw)
    statement = entry.get("statement") or {}
    dead.append(
        {"id": statement.get("id"), "reason": entry.get("reason"), "status": entry.get("status")}
    )
# Messages a node has taken and not yet recorded in unacked.
in_flight = sum(client.llen(key) for key in inflight_lists)
print(
    json.dumps(
        {
            "queue": client.llen("xapi"),
            "unacked": client.hlen("unacked"),
            "in_flight": in_flight,
            "spooled": spool_sum("depth"),
            "dead": dead,
        }
    )
)
