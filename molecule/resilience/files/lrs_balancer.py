"""A balancer in front of Ralph on the LRS host, for tests/test_balancer_drain.py.

Stdlib only (the host's /usr/bin/python3), run as a transient unit of the LRS host:

    python3 lrs_balancer.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT MODE_FILE COUNTS

Every request goes to Ralph (UPSTREAM) unless the mode (the first word of MODE_FILE, read
again on each request, so that a test switches it with a rename) says otherwise:

- ``pass``: every request to Ralph;
- ``balancer``: one broken backend among two, taken in turn: every other POST is answered
  ``503`` with an HTML page, without reaching Ralph; the others, and every GET, reach it;
- ``far``: every POST is answered ``503`` with ``Retry-After`` two years ahead (an HTTP
  date), as a maintenance page that asks for a wait no worker should honour in full;
- ``balancer N``: the balancer for N POSTs, then ``far`` (a far ``Retry-After`` met in the
  middle of a drain, wherever the drain is by then).

Ralph away (its port closed) makes a ``502`` HTML page, as a balancer with no backend left.
COUNTS gets, after each POST, one JSON line: the POSTs answered so far by each kind of answer.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FAR_SECONDS = 2 * 365 * 86400
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
PAGE = "<html><head><title>{0}</title></head><body><h1>{0}</h1></body></html>"


class Balancer:
    def __init__(self, upstream: tuple[str, int], mode_file: Path, counts_file: Path) -> None:
        self.upstream = upstream
        self.mode_file = mode_file
        self.counts_file = counts_file
        self.lock = threading.Lock()
        self.posts = 0
        self.counts: dict[str, int] = {}

    def mode(self) -> str:
        try:
            words = self.mode_file.read_text(encoding="utf-8").split()
        except OSError:
            return "pass"
        if not words:
            return "pass"
        if words[0] == "balancer" and len(words) > 1:
            with self.lock:
                return "far" if self.posts >= int(words[1]) else "balancer"
        return words[0]

    def count(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            line = json.dumps(self.counts, sort_keys=True)
            self.counts_file.write_text(line + "\n", encoding="utf-8")

    def broken_backend(self) -> bool:
        """The backends in turn: the second one is broken."""
        with self.lock:
            self.posts += 1
            return self.posts % 2 == 0


def page(status: int, reason: str) -> tuple[int, dict[str, str], bytes]:
    body = PAGE.format(f"{status} {reason}").encode()
    return status, {"Content-Type": "text/html; charset=utf-8"}, body


def handler(balancer: Balancer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            post = self.command == "POST"
            mode = balancer.mode() if post else "pass"
            if mode == "far":
                when = email.utils.formatdate(time.time() + FAR_SECONDS, usegmt=True)
                status, headers, payload = page(503, "Service Unavailable")
                balancer.count("far")
                self.answer(status, {**headers, "Retry-After": when}, payload)
                return
            if mode == "balancer" and balancer.broken_backend():
                balancer.count("broken")
                self.answer(*page(503, "Service Unavailable"))
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPConnection(*balancer.upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except OSError:
                if post:
                    balancer.count("no backend")
                self.answer(*page(502, "Bad Gateway"))
                return
            finally:
                conn.close()
            if post:
                balancer.count(f"ralph {resp.status}")
            kept = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP}
            self.answer(resp.status, kept, data)

        do_GET = handle_one
        do_POST = handle_one
        do_PUT = handle_one

    return Handler


def main(argv: list[str]) -> int:
    host, port, up_host, up_port, mode_file, counts_file = argv
    balancer = Balancer((up_host, int(up_port)), Path(mode_file), Path(counts_file))
    server = ThreadingHTTPServer((host, int(port)), handler(balancer))
    server.daemon_threads = True
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
