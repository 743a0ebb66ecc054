"""Second half of the end-to-end probe, on an encoding host (as the worker's user).

Reads one JSON object on stdin: {"id", "queued_at", "timeout", "lrs_url", "lrs_login",
"lrs_password", "broker_url", "ca_bundle"}, the broker URL being the worker's for the
frontal's broker. Waits until the LRS returns the statement by id, and prints one JSON line:
    {"ok": true, "id": ..., "latency_ms": ...}
or {"ok": false, "hop": "lrs|lrs-credentials|worker|delivery", "message": ...}. The latency
runs from the frontal's clock at .delay() to this host's when the LRS first returns it.
Credentials come on stdin, never on the command line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import redis
import requests

QUEUE = "xapi"
DEAD_LETTERS = "xapi.dead_letters"
HEADERS = {"X-Experience-API-Version": "1.0.3"}


class HopError(Exception):
    def __init__(self, hop: str, message: str) -> None:
        super().__init__(message)
        self.hop = hop


def lrs_get(
    session: requests.Session, url: str, params: dict[str, Any], verify: str | bool
) -> requests.Response:
    try:
        response = session.get(url, params=params, timeout=(5, 15), verify=verify)
    except requests.RequestException as error:
        raise HopError("lrs", f"LRS unreachable at {url}: {type(error).__name__}") from error
    if response.status_code in (401, 403):
        raise HopError(
            "lrs-credentials",
            f"LRS refused xapi_lrs_login/xapi_lrs_password ({response.status_code}) at {url}",
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
    try:
        body = response.json()
    except ValueError:  # a proxy's HTML page is no answer of the LRS
        return False
    found = body.get("statements", [body]) if isinstance(body, dict) else body
    return any(isinstance(item, dict) and item.get("id") == statement_id for item in found)


def diagnose(broker_url: str, statement_id: str, waited: float) -> HopError:
    try:
        client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
        queued = client.llen(QUEUE)
        letters = client.lrange(DEAD_LETTERS, -50, -1)
    except redis.RedisError as error:
        return HopError("worker", f"the broker cannot be read from this encoding host: {error}")
    if queued:
        return HopError(
            "worker",
            f"{queued} message(s) still wait in Redis list '{QUEUE}' after {waited:.0f} s: "
            "no worker consumes the queue (is celeryd-xapi running with -Q xapi on the "
            "encoding hosts, and can they reach Redis?)",
        )
    for raw in letters:
        letter = json.loads(raw)
        if letter.get("statement", {}).get("id") == statement_id:
            return HopError("delivery", f"the worker dead-lettered it: {letter.get('reason')}")
    return HopError(
        "delivery",
        f"the queue is empty but the LRS has not stored the statement after {waited:.0f} s: "
        "see the worker's log on the encoding hosts (LRS unreachable from there, or retrying)",
    )


def run(request: dict[str, Any]) -> dict[str, Any]:
    url, wanted = request["lrs_url"], request["id"]
    verify: str | bool = request.get("ca_bundle") or True
    started = time.monotonic()
    with requests.Session() as session:
        session.auth = (request["lrs_login"], request["lrs_password"])
        session.headers.update(HEADERS)
        while time.monotonic() - started < float(request["timeout"]):
            if stored(lrs_get(session, url, {"statementId": wanted}, verify), wanted):
                latency = (time.time() - float(request["queued_at"])) * 1000
                return {"ok": True, "id": wanted, "latency_ms": max(0, round(latency))}
            time.sleep(0.1)
    raise diagnose(request["broker_url"], wanted, time.monotonic() - started)


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        result = run(request)
    except HopError as error:
        result = {"ok": False, "hop": error.hop, "message": str(error)}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
