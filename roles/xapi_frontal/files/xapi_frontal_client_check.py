"""Does the broker client of Pod's venv work? Run with the venv's python.

A fresh install of Pod's pins resolves a kombu whose Redis transport refuses Pod's redis-py
(docs/upstream-facts.md §2.11). Checks that kombu's own `redis` extra accepts the installed
redis-py and, when stdin carries {"url": ...} (never argv: it holds the password), opens a
real channel.
Prints {"ok": bool, "kombu": ver, "redis": ver, "detail": ...}.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from urllib.parse import unquote, urlsplit

from packaging.requirements import Requirement


def redis_extra_ok(redis_version: str) -> str | None:
    for text in metadata.requires("kombu") or []:
        req = Requirement(text)
        if req.name == "redis" and req.marker and req.marker.evaluate({"extra": "redis"}):
            if not req.specifier.contains(redis_version, prereleases=True):
                return f"kombu's redis extra needs redis{req.specifier}"
    return None


def channel_ok(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=5, transport_options={"max_retries": 1}) as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.channel()
        channel.client.ping()
        channel.close()


def redact(text: str, url: str | None) -> str:
    secret = urlsplit(url).password if url else None
    for form in filter(None, {secret, secret and unquote(secret)}):
        text = text.replace(form, "***")
    return text


def main() -> None:
    data = sys.stdin.read().strip()
    url = json.loads(data).get("url") if data else None
    result = {"kombu": metadata.version("kombu"), "redis": metadata.version("redis")}
    problem = redis_extra_ok(result["redis"])
    if problem is None and url:
        try:
            channel_ok(url)
        except Exception as exc:  # any failure is the answer: report its type and text
            problem = redact(f"{type(exc).__name__}: {exc}", url)
    result.update(ok=problem is None, detail=problem or "ok")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
