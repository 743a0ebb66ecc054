"""Lab stand-in for Pod's uWSGI application: a web process that uses Pod's Redis as Pod does.

Pod (settings of its Redis documentation) keeps its select2 cache in db 2, its Django cache
in db 3 (django_redis, keys "pod:1:<key>"), its sessions in db 4 (redis_sessions, keys
"session:<key>", socket_timeout 1) and queues its encodings in db 5 (Celery, list
"celery"), all on the frontal's Redis, password-less. Each GET / does what a page view does
there: read a session, read and write the cache. It answers 200 with what it did, or 503
with Redis' error, so a test sees at once whether Pod still gets its Redis.
Run from Pod's directory with Pod's venv (redis-py), as user pod.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis

sys.path.insert(0, ".")
from pod.custom import settings_local as settings

CACHE = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"], socket_timeout=1)
SELECT2 = redis.Redis.from_url(settings.CACHES["select2"]["LOCATION"], socket_timeout=1)
SESSIONS = redis.Redis(
    host=settings.SESSION_REDIS["host"],
    port=settings.SESSION_REDIS["port"],
    db=settings.SESSION_REDIS["db"],
    socket_timeout=settings.SESSION_REDIS["socket_timeout"],
)
SESSION_KEY = "session:" + "lab0session0key0000000000000000"


class Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        try:
            hits = CACHE.incr("pod:1:standin:page-views")
            CACHE.expire("pod:1:standin:page-views", 600)
            body = {
                "page_views": hits,
                "session": SESSIONS.exists(SESSION_KEY) == 1,
                "select2": SELECT2.dbsize(),
            }
            status = 200
        except redis.RedisError as error:
            body, status = {"redis_error": f"{type(error).__name__}: {error}"}, 503
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", 8000), Page).serve_forever()
