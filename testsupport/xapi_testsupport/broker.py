"""The broker's ACL as the tests check it: what Pod's producer user (the credentials a
compromised web application on the frontal holds) must be refused. One list, checked twice:
against the rendered users.acl by redis-server's dry run (tests/test_broker_acl.py) and
against the deployed broker (molecule/default/tests/test_redis.py)."""

from __future__ import annotations

# Reading, taking or deleting the queue, the in-flight lists, unacked and the dead letters;
# Lua; the workers' remote control and events; the server's configuration, clients and
# keyspace. Each entry is one command with its arguments.
PRODUCER_REFUSED: list[list[str]] = [
    ["LRANGE", "xapi", "0", "-1"],
    ["LINDEX", "xapi", "0"],
    ["LPOP", "xapi"],
    ["RPOP", "xapi"],
    ["BRPOP", "xapi", "1"],
    ["BLMOVE", "xapi", "xapi.inflight.x", "RIGHT", "LEFT", "1"],
    ["LMOVE", "xapi", "xapi.dead_letters", "RIGHT", "LEFT"],
    ["LREM", "xapi", "0", "x"],
    ["LTRIM", "xapi", "1", "0"],
    ["DEL", "xapi"],
    ["UNLINK", "xapi"],
    ["RENAME", "xapi", "elsewhere"],
    ["EXPIRE", "xapi", "1"],
    ["GET", "unacked"],
    ["HGETALL", "unacked"],
    ["HDEL", "unacked", "x"],
    ["LRANGE", "xapi.dead_letters", "0", "-1"],
    ["LRANGE", "xapi.inflight.node", "0", "-1"],
    ["SMEMBERS", "xapi.inflight"],
    ["SREM", "_kombu.binding.xapi", "x"],
    ["DEL", "_kombu.binding.xapi"],
    ["LPUSH", "unacked", "x"],
    ["LPUSH", "xapi.dead_letters", "x"],
    ["EVAL", "return 1", "0"],
    ["EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"],
    ["SCRIPT", "LOAD", "return 1"],
    ["FUNCTION", "LIST"],
    ["FLUSHALL"],
    ["FLUSHDB"],
    ["KEYS", "*"],
    ["SCAN", "0"],
    ["PUBLISH", "/6.celery.pidbox", "x"],
    ["SUBSCRIBE", "/6.celeryev/worker.heartbeat"],
    ["PSUBSCRIBE", "/6.celeryev/worker.*"],
    ["CONFIG", "GET", "maxmemory"],
    ["CLIENT", "LIST"],
    ["INFO"],
    ["MONITOR"],
    ["SHUTDOWN"],
    ["ACL", "LIST"],
]
