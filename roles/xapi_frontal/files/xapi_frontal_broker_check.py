"""Can this host use the xAPI broker? Standard library only (Pod's venv may be broken).

Reads {host, port, user, password, db, tls, ca_file, timeout, eviction} as JSON on stdin
(the password never goes through argv), speaks RESP to Redis: AUTH user password, SELECT
db, PING, and with "eviction" true (a broker the bundle does not manage) INFO memory, whose
maxmemory_policy must be noeviction: Celery's messages must never be evicted. Prints
{"ok": bool, "reason": ..., "detail": ...}; reason is one of ok, unreachable,
auth_refused, noauth, noperm, protocol, evicts, policy_unknown. No message echoes the
password.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from typing import IO


def command(*args: object) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def reply(stream: IO[bytes]) -> str:
    line = stream.readline()
    if not line:
        raise ConnectionError("connection closed by the broker")
    return line.decode(errors="replace").rstrip("\r\n")


def bulk(stream: IO[bytes], header: str) -> str:
    """The body of a bulk-string reply whose first line was ``header`` ($N)."""
    size = int(header[1:])
    return stream.read(size + 2)[:size].decode(errors="replace") if size >= 0 else ""


def eviction_policy(raw: socket.socket, stream: IO[bytes]) -> tuple[str, str]:
    raw.sendall(command("INFO", "memory"))
    answer = reply(stream)
    if not answer.startswith("$"):
        return "policy_unknown", f"INFO memory: {answer}"
    fields = dict(line.split(":", 1) for line in bulk(stream, answer).splitlines() if ":" in line)
    policy = fields.get("maxmemory_policy", "?")
    if policy != "noeviction":
        return "evicts", f"maxmemory_policy is {policy}"
    return "ok", "PONG, maxmemory_policy noeviction"


def classify(answer: str, step: str) -> str | None:
    if answer.startswith(("+", ":")):
        return None
    word = answer[1:].split(" ", 1)[0] if answer.startswith("-") else ""
    if word == "WRONGPASS" or (step == "AUTH" and answer.startswith("-")):
        return "auth_refused"
    if word == "NOAUTH":
        return "noauth"
    if word == "NOPERM":
        return "noperm"
    return "protocol"


def check(cfg: dict) -> tuple[str, str]:
    try:
        raw = socket.create_connection((cfg["host"], int(cfg["port"])), timeout=cfg["timeout"])
        if cfg.get("tls"):
            context = ssl.create_default_context(cafile=cfg.get("ca_file") or None)
            raw = context.wrap_socket(raw, server_hostname=cfg["host"])
    except (OSError, ssl.SSLError) as exc:
        return "unreachable", f"{cfg['host']}:{cfg['port']}: {exc}"
    try:
        with raw, raw.makefile("rb") as stream:
            steps = [
                ("AUTH", (cfg["user"], cfg["password"])),
                ("SELECT", (cfg["db"],)),
                ("PING", ()),
            ]
            for name, args in steps:
                raw.sendall(command(name, *args))
                answer = reply(stream)
                reason = classify(answer, name)
                if reason:
                    return reason, f"{name}: {answer}"
            if cfg.get("eviction"):
                return eviction_policy(raw, stream)
    except (OSError, ConnectionError) as exc:
        return "unreachable", f"{cfg['host']}:{cfg['port']}: {exc}"
    return "ok", "PONG"


def main() -> None:
    reason, detail = check(json.load(sys.stdin))
    print(json.dumps({"ok": reason == "ok", "reason": reason, "detail": detail}))


if __name__ == "__main__":
    main()
