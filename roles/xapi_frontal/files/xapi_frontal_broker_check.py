"""Can this host use the xAPI broker? Standard library only (Pod's venv may be broken).

Reads {host, port, user, password, db, tls, ca_file, timeout, eviction} as JSON on stdin
(the password never goes through argv), speaks RESP to Redis: AUTH user password, SELECT
db, PING, and with "eviction" true (a broker the bundle does not manage) INFO memory, whose
maxmemory_policy must be noeviction: Celery's messages must never be evicted. Prints
{"ok": bool, "reason": ..., "detail": ...}; reason is one of ok, unreachable,
auth_refused, noauth, noperm, protocol, evicts, policy_unknown, ca_unreadable. No message
echoes the password.

The role runs it as nobody (it parses whatever answers on the broker's port): the broker's
CA, the one file it opens, must be readable by every user.

The Redis client is the worker package's (xapi_worker/resp.py): the role runs this file
before anything is installed, with the client's source as its first argument
(tasks/preflight.yml).
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any


def load_resp(source: str) -> Any:  # noqa: ANN401 (a module made from source)
    """The shared client, from its source (it imports nothing of the package)."""
    module = types.ModuleType("xapi_resp")
    exec(compile(source, "xapi_worker/resp.py", "exec"), module.__dict__)  # noqa: S102
    return module


def eviction_policy(client: Any) -> tuple[str, str]:  # noqa: ANN401
    answer = client.call("INFO", "memory")
    if not isinstance(answer, bytes):
        return "policy_unknown", f"INFO memory: {answer}"
    text = answer.decode(errors="replace")
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    policy = fields.get("maxmemory_policy", "?").strip()
    if policy != "noeviction":
        return "evicts", f"maxmemory_policy is {policy}"
    return "ok", "PONG, maxmemory_policy noeviction"


def classify(code: str, step: str) -> str:
    """The reason of an error reply whose first word is ``code`` to command ``step``."""
    if code == "WRONGPASS" or step == "AUTH":
        return "auth_refused"
    if code == "NOAUTH":
        return "noauth"
    if code == "NOPERM":
        return "noperm"
    return "protocol"


def check(cfg: dict, resp: Any) -> tuple[str, str]:  # noqa: ANN401
    where = f"{cfg['host']}:{cfg['port']}"
    if cfg.get("tls") and cfg.get("ca_file"):
        try:
            with open(cfg["ca_file"], "rb"):
                pass
        except OSError as exc:
            return "ca_unreadable", f"{cfg['ca_file']}: {exc.strerror}"
    try:
        client = resp.Connection(
            cfg["host"],
            int(cfg["port"]),
            cfg["timeout"],
            bool(cfg.get("tls")),
            cfg.get("ca_file") or "",
        )
    except OSError as exc:  # ssl.SSLError is one
        return "unreachable", f"{where}: {exc}"
    try:
        with client:
            steps = [
                ("AUTH", (cfg["user"], cfg["password"])),
                ("SELECT", (str(cfg["db"]),)),
                ("PING", ()),
            ]
            for name, args in steps:
                try:
                    client.call(name, *args)
                except resp.ReplyError as exc:
                    return classify(exc.code, name), f"{name}: -{exc}"
                except resp.ProtocolError as exc:
                    if exc.closed:
                        return "unreachable", f"{where}: {exc}"
                    return "protocol", f"{name}: {exc}"
            if cfg.get("eviction"):
                try:
                    return eviction_policy(client)
                except resp.ReplyError as exc:
                    return "policy_unknown", f"INFO memory: -{exc}"
    except OSError as exc:
        return "unreachable", f"{where}: {exc}"
    return "ok", "PONG"


def main() -> None:
    cfg = json.load(sys.stdin)
    if len(sys.argv) > 1:  # as the role runs it
        resp = load_resp(sys.argv[1])
    else:
        from xapi_worker import resp
    reason, detail = check(cfg, resp)
    print(json.dumps({"ok": reason == "ok", "reason": reason, "detail": detail}))


if __name__ == "__main__":
    main()
