"""Prints Pod's data in the frontal's Redis (dbs 2-5) as JSON: every key, its type, its value
and whether it expires. The lab web stand-in's own counter, which changes with every page
view, is left out. Run with Pod's venv, as user pod (lab and tests only)."""

from __future__ import annotations

import base64
import json

import redis

STANDIN_COUNTER = b"pod:1:standin:page-views"


def value(client: redis.Redis, key: bytes, kind: str) -> object:
    if kind == "string":
        return base64.b64encode(client.get(key) or b"").decode()
    if kind == "list":
        return [base64.b64encode(v).decode() for v in client.lrange(key, 0, -1)]
    if kind == "hash":
        return {k.decode(): base64.b64encode(v).decode() for k, v in client.hgetall(key).items()}
    if kind == "set":
        return sorted(base64.b64encode(v).decode() for v in client.smembers(key))
    return kind


state = {}
for db in (2, 3, 4, 5):
    client = redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=3)
    keys = {}
    for key in sorted(client.scan_iter(count=1000)):
        if key == STANDIN_COUNTER:
            continue
        kind = client.type(key).decode()
        keys[base64.b64encode(key).decode()] = {
            "type": kind,
            "value": value(client, key, kind),
            "expires": client.ttl(key) >= 0,
        }
    state[str(db)] = keys
print(json.dumps(state, sort_keys=True))
