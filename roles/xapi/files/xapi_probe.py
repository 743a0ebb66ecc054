"""End-to-end probe of the xAPI pipeline, run on Pod's frontal with Pod's venv and settings.

It queues one statement exactly as Pod's view does (`send_xapi_statement_task.delay` of
Pod's own task module), waits until the LRS returns it by id, and prints one JSON line:
    {"ok": true, "id": ..., "latency_ms": ...}
or, when a hop is broken, {"ok": false, "hop": "broker|lrs|lrs-credentials|worker|delivery",
"message": ...}. The exit code is 0 only when the statement was delivered.
Usage (cwd = Pod's directory): python xapi_probe.py TIMEOUT_SECONDS
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
import requests

sys.path.insert(0, ".")
from pod.custom import settings_local as pod_settings
from pod.xapi.xapi_tasks import send_xapi_statement_task

QUEUE = "xapi"
DEAD_LETTERS = "xapi.dead_letters"
HEADERS = {"X-Experience-API-Version": "1.0.3"}


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


def broker() -> redis.Redis:
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
    return client


def lrs_session() -> requests.Session:
    session = requests.Session()
    session.auth = (pod_settings.XAPI_LRS_LOGIN, pod_settings.XAPI_LRS_PWD)
    session.headers.update(HEADERS)
    return session


def lrs_get(session: requests.Session, params: dict[str, Any]) -> requests.Response:
    url = pod_settings.XAPI_LRS_URL
    try:
        response = session.get(url, params=params, timeout=(5, 15))
    except requests.RequestException as error:
        raise HopError("lrs", f"LRS unreachable at {url}: {type(error).__name__}") from error
    if response.status_code in (401, 403):
        raise HopError(
            "lrs-credentials",
            f"LRS refused XAPI_LRS_LOGIN/XAPI_LRS_PWD ({response.status_code}) at {url}",
        )
    if response.status_code >= 500:
        raise HopError("lrs", f"LRS error {response.status_code} at {url}")
    return response


def stored(response: requests.Response, statement_id: str) -> bool:
    """True when the LRS returned the statement. The xAPI spec answers ?statementId= with
    the statement itself (404 when unknown); Ralph answers 200 with a StatementResult whose
    list is empty while the statement is not stored."""
    if response.status_code != 200:
        return False
    body = response.json()
    found = body.get("statements", [body]) if isinstance(body, dict) else body
    return any(isinstance(item, dict) and item.get("id") == statement_id for item in found)


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


def diagnose(client: redis.Redis, statement_id: str, waited: float) -> HopError:
    queued = client.llen(QUEUE)
    if queued:
        return HopError(
            "worker",
            f"{queued} message(s) still wait in Redis list '{QUEUE}' after {waited:.0f} s: "
            "no worker consumes the queue (is celeryd-xapi running with -Q xapi on the "
            "encoding hosts, and can they reach Redis?)",
        )
    for raw in client.lrange(DEAD_LETTERS, -50, -1):
        letter = json.loads(raw)
        if letter.get("statement", {}).get("id") == statement_id:
            return HopError("delivery", f"the worker dead-lettered it: {letter.get('reason')}")
    return HopError(
        "delivery",
        f"the queue is empty but the LRS has not stored the statement after {waited:.0f} s: "
        "see the worker's log on the encoding hosts (LRS unreachable from there, or retrying)",
    )


def run(timeout: float) -> dict[str, Any]:
    client = broker()
    session = lrs_session()
    lrs_get(session, {"limit": 1})
    sent = statement()
    started = time.monotonic()
    send_xapi_statement_task.delay(sent)
    while time.monotonic() - started < timeout:
        if stored(lrs_get(session, {"statementId": sent["id"]}), sent["id"]):
            latency = (time.monotonic() - started) * 1000
            return {"ok": True, "id": sent["id"], "latency_ms": round(latency)}
        time.sleep(0.1)
    raise diagnose(client, sent["id"], timeout)


def main() -> int:
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    try:
        result = run(timeout)
    except HopError as error:
        result = {"ok": False, "hop": error.hop, "message": str(error)}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
