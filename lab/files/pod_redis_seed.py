"""Gives the lab frontal's Redis the data a live Pod has in it (lab/prepare.yml, once).

select2 cache entries (db 2) and Django cache entries (db 3) with their TTLs, a user's
session (db 4, written as redis_sessions does: SETEX "session:<key>"), and two encoding
tasks in Pod's encoding queue (db 5, list "celery"), as Pod's frontal queues them with
task_start_encode.delay(video_id): the encoding host takes the first, the second waits.
The messages are written in the shape Celery 5.4 gives them (protocol 2, JSON): the lab
frontal's venv is a fresh install of Pod's requirements, whose kombu cannot publish with
redis 5.2.0 (docs/seed-defects.md), which a live site has worked around. Run from Pod's
directory with Pod's venv, as user pod.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid

import redis

sys.path.insert(0, ".")
from pod.custom import settings_local as settings

select2 = redis.Redis.from_url(settings.CACHES["select2"]["LOCATION"])
cache = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
sessions = redis.Redis(
    host=settings.SESSION_REDIS["host"],
    port=settings.SESSION_REDIS["port"],
    db=settings.SESSION_REDIS["db"],
)
select2.set(":1:select2_lab_owners", b"\x80\x04\x95\x05lab-pickled-choices", ex=86400)
select2.set(":1:select2_lab_channels", b"\x80\x04\x95\x05lab-pickled-channels", ex=86400)
cache.set("pod:1:views.decorators.cache.cache_page.lab", b"<html>cached page</html>", ex=86400)
cache.set("pod:1:lab_menu_channels", b"\x80\x04\x95lab-pickled-menu", ex=86400)
cache.set("pod:1:lab_no_expiry", b"kept until deleted")
sessions.setex("session:lab0session0key0000000000000000", 1209600, b"lab-session-data")


def encoding_message(video_id: int) -> dict:
    """Celery 5.4's message for task_start_encode.delay(video_id) (protocol 2, JSON)."""
    task_id = str(uuid.uuid4())
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([[video_id], {}, embed])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": "pod.main.tasks.task_start_encode",
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": f"({video_id},)",
            "kwargsrepr": "{}",
            "origin": "gen1234@pod-frontal",
            "ignore_result": False,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


encoding = redis.Redis.from_url(settings.CELERY_BROKER_URL)
encoding.sadd("_kombu.binding.celery", "celery\x06\x16\x06\x16celery")
# Queued as Pod's frontal queues them: the first one is taken by the encoding host.
encoding.lpush("celery", json.dumps(encoding_message(42)))
encoding.lpush("celery", json.dumps(encoding_message(43)))
