"""What a compromised web application on the frontal can do to the xAPI broker with the
credentials it holds: the broker URL of Pod's settings_local.py (the producer's user).
Run as user pod with Pod's venv (cwd = Pod's directory).

    python webapp_attack.py queue|control|lua

Prints one JSON object: each attempt's name -> "refused: <Redis error>" or "ALLOWED: ...".
Nothing is allowed to happen: every attempt must be refused (security review point 4).
"""

from __future__ import annotations

import json
import sys

import redis
from celery import Celery
from pod.custom import settings_local

URL = settings_local.XAPI_CELERY_BROKER_URL
LUA_BUSY_LOOP = "while true do end"


def attempt(results: dict[str, str], name: str, call) -> None:
    try:
        answer = call()
    except redis.ResponseError as error:  # NOPERM is a ResponseError
        results[name] = f"refused: {error}"
    except Exception as error:  # kombu wraps the same refusal in its own errors
        results[name] = f"refused: {type(error).__name__}: {error}"
    else:
        results[name] = f"ALLOWED: {answer!r}"[:200]


def queue(client: redis.Redis) -> dict[str, str]:
    """Read, take or delete the statements: queued, taken, unacknowledged, dead-lettered."""
    results: dict[str, str] = {}
    attempt(results, "LRANGE xapi", lambda: client.lrange("xapi", 0, -1))
    attempt(results, "LINDEX xapi", lambda: client.lindex("xapi", 0))
    attempt(results, "LPOP xapi", lambda: client.lpop("xapi"))
    attempt(results, "RPOP xapi", lambda: client.rpop("xapi"))
    attempt(results, "BRPOP xapi", lambda: client.brpop(["xapi"], 1))
    attempt(results, "LMOVE xapi", lambda: client.lmove("xapi", "stolen", "RIGHT", "LEFT"))
    attempt(results, "DEL xapi", lambda: client.delete("xapi"))
    attempt(results, "RENAME xapi", lambda: client.rename("xapi", "stolen"))
    attempt(results, "HGETALL unacked", lambda: client.hgetall("unacked"))
    attempt(results, "DEL unacked", lambda: client.delete("unacked"))
    attempt(results, "SMEMBERS xapi.inflight", lambda: client.smembers("xapi.inflight"))
    attempt(results, "LRANGE dead letters", lambda: client.lrange("xapi.dead_letters", 0, -1))
    attempt(results, "DEL dead letters", lambda: client.delete("xapi.dead_letters"))
    attempt(results, "KEYS *", lambda: client.keys("*"))
    attempt(results, "SCAN", lambda: client.scan(0))
    attempt(results, "FLUSHDB", client.flushdb)
    attempt(results, "FLUSHALL", client.flushall)
    attempt(results, "CONFIG GET", lambda: client.config_get("*"))
    return results


def control() -> dict[str, str]:
    """Celery's remote control, as `celery control` would send it: stop or stall the workers."""
    app = Celery("attacker", broker=URL)
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    results: dict[str, str] = {}
    attempt(results, "control shutdown", lambda: app.control.shutdown(timeout=2))
    attempt(
        results,
        "control cancel_consumer xapi",
        lambda: app.control.cancel_consumer("xapi", reply=True, timeout=2),
    )
    attempt(results, "control pool_shrink", lambda: app.control.pool_shrink(1))
    attempt(results, "inspect ping", lambda: app.control.inspect(timeout=2).ping())
    client = redis.Redis.from_url(URL, socket_timeout=5)
    attempt(results, "PUBLISH pidbox", lambda: client.publish("/6.celery.pidbox", "x"))
    attempt(results, "SUBSCRIBE events", lambda: next(_subscribe(client)))
    app.close()
    return results


def _subscribe(client: redis.Redis):
    pubsub = client.pubsub()
    pubsub.psubscribe("/6.celeryev/worker.*")
    yield pubsub.get_message(timeout=2)


def lua(client: redis.Redis) -> dict[str, str]:
    """Arbitrary Lua: EVAL, and SCRIPT LOAD + EVALSHA, which amount to it. The script is a
    busy loop: allowed, it would freeze Redis for every client."""
    results: dict[str, str] = {}
    attempt(results, "EVAL", lambda: client.eval(LUA_BUSY_LOOP, 0))
    attempt(results, "SCRIPT LOAD", lambda: client.script_load(LUA_BUSY_LOOP))
    sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"[:40]
    attempt(results, "EVALSHA", lambda: client.evalsha(sha, 0))
    attempt(results, "FUNCTION LOAD", lambda: client.function_load("#!lua name=x\n"))
    attempt(results, "FCALL", lambda: client.fcall("x", 0))
    return results


def main() -> None:
    what = sys.argv[1]
    client = redis.Redis.from_url(URL, socket_timeout=5)
    results = {"queue": lambda: queue(client), "control": control, "lua": lambda: lua(client)}
    print(json.dumps(results[what]()))


if __name__ == "__main__":
    main()
