"""First half of the end-to-end probe, on Pod's frontal with Pod's venv and settings.

It queues one statement exactly as Pod's view does (`send_xapi_statement_task.delay` of
Pod's own task module) and prints one JSON line:
    {"ok": true, "id": ..., "queued_at": UNIX_TIME}
or {"ok": false, "hop": "broker", "message": ...}. The second half
(xapi_probe_read.py) waits for the statement in the LRS from an encoding host: the frontal
holds no LRS credential, and its broker user may queue but not read the queue.
Usage (cwd = Pod's directory): python xapi_probe_queue.py
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

sys.path.insert(0, ".")
from pod.custom import settings_local as pod_settings
from pod.xapi.xapi_tasks import send_xapi_statement_task


class HopError(Exception):
    def __init__(self, hop: str, message: str) -> None:
        super().__init__(message)
        self.hop = hop


def masked(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_broker() -> None:
    """PING with the producer's credentials: a refusal names the broker hop before .delay()."""
    url = pod_settings.XAPI_CELERY_BROKER_URL
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.AuthenticationError as error:
        raise HopError("broker", f"Redis refused the credentials of {masked(url)}") from error
    except redis.ResponseError as error:  # NOPERM, WRONGPASS on some versions
        raise HopError("broker", f"Redis refused {masked(url)}: {error}") from error
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise HopError("broker", f"Redis unreachable at {masked(url)}: {error}") from error
    finally:
        client.close()


def statement() -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).isoformat()
    return {
        "id": str(uuid.uuid4()),
        "actor": {"name": "xapi-probe", "mbox": "mailto:xapi-probe@example.org"},
        "verb": {
            "id": "https://w3id.org/xapi/video/verbs/played",
            "display": {"en-US": "played"},
        },
        "object": {
            "id": "https://pod.example.org/video/0001-probe/",
            "objectType": "Activity",
            "definition": {"type": "https://w3id.org/xapi/video/activity-type/video"},
        },
        "result": {"extensions": {"https://w3id.org/xapi/video/extensions/time": 0.0}},
        "context": {"contextActivities": {"category": [{"id": "https://w3id.org/xapi/video"}]}},
        "timestamp": now,
    }


def main() -> int:
    try:
        check_broker()
        sent = statement()
        queued_at = time.time()
        send_xapi_statement_task.delay(sent)
        result: dict[str, Any] = {"ok": True, "id": sent["id"], "queued_at": queued_at}
    except HopError as error:
        result = {"ok": False, "hop": error.hop, "message": str(error)}
    except Exception as error:  # kombu's refusals come as many types; the hop is the broker
        result = {"ok": False, "hop": "broker", "message": f"{type(error).__name__}: {error}"}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
