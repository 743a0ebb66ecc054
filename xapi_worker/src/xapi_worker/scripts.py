"""The worker's writes to the broker, as Lua scripts that run at ``maxmemory``.

With ``maxmemory-policy noeviction``, Redis refuses every command that may grow memory
(``denyoom``: LPUSH, SET, SADD, HSET, LMOVE, BLMOVE...) once ``used_memory`` passes
``maxmemory``. The producers must be refused then: that is what bounds the queue. The worker
must not be: it is the only one that can drain the queue, and what it writes (a message moved
from the queue to ``unacked``, a retry that replaces the message it acknowledges, a dead letter
that replaces a message, a heartbeat key) is about as large as what it removes. Scripts
declared ``#!lua flags=allow-oom`` (Redis 7.0 and later) may write at ``maxmemory``; plain
commands and MULTI/EXEC may not. Each script is atomic, as the MULTI it replaces was.

The xAPI ACL user needs EVALSHA and SCRIPT LOAD, and the commands each script runs.
"""

from __future__ import annotations

from typing import Any

import redis

_HEADER = "#!lua flags=allow-oom\n"

# KEYS[1] queue, KEYS[2] in-flight list; ARGV[1] how many. Moves up to that many messages,
# as that many LMOVEs would; returns them oldest first.
TAKE = (
    _HEADER
    + """
local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local raw = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not raw then break end
  taken[#taken + 1] = raw
end
return taken
"""
)

# KEYS: unacked_index, unacked, in-flight list, unreadable list. ARGV[1] = score, ARGV[2] = n
# readable, ARGV[3] = m taken, then n (tag, record) pairs, then the m raw messages taken, then
# the unreadable ones. Records the readable messages in unacked, removes every taken one from
# the in-flight list and sets the unreadable ones aside.
HAND_OVER = (
    _HEADER
    + """
local n, m = tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
for _ = 1, n do
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
for _ = 1, m do
  redis.call('LREM', KEYS[3], 1, ARGV[i])
  i = i + 1
end
while i <= #ARGV do
  redis.call('RPUSH', KEYS[4], ARGV[i])
  i = i + 1
end
return n
"""
)

# KEYS[1] heartbeat key, KEYS[2] registry; ARGV[1] node, ARGV[2] ttl (s), ARGV[3] list name.
HEARTBEAT = (
    _HEADER
    + """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""
)

# KEYS[1] list; ARGV[1] 'left' or 'right', ARGV[2...] values. A push of the worker's own.
PUSH = (
    _HEADER
    + """
local command = ARGV[1] == 'left' and 'LPUSH' or 'RPUSH'
for i = 2, #ARGV do
  redis.call(command, KEYS[1], ARGV[i])
end
return #ARGV - 1
"""
)

# KEYS[1] unacked, KEYS[2] unacked_index, KEYS[3...] target lists; ARGV[1] tag, ARGV[2] the
# record read before, ARGV[3] 'left' or 'right', ARGV[4] the payload to push. Moves one
# message from unacked back onto its queue(s), only if its record is still the one read.
RESTORE = (
    _HEADER
    + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local command = ARGV[3] == 'left' and 'LPUSH' or 'RPUSH'
for i = 3, #KEYS do
  redis.call(command, KEYS[i], ARGV[4])
end
return 1
"""
)

# KEYS[1] unacked, KEYS[2] unacked_index, KEYS[3] the unreadable list; ARGV[1] a tag. Moves
# that message's record from unacked to the end of the unreadable list (a message that could
# not be dead-lettered); returns 0 when it is no longer in unacked.
SET_ASIDE = (
    _HEADER
    + """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
redis.call('RPUSH', KEYS[3], record)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
)

# KEYS[1] unacked_index, KEYS[2] unacked; ARGV the delivery tags acknowledged. (Inside
# MULTI, Redis refuses even these removals at maxmemory.)
ACK = (
    _HEADER
    + """
redis.call('ZREM', KEYS[1], unpack(ARGV))
return redis.call('HDEL', KEYS[2], unpack(ARGV))
"""
)


# KEYS[1] source list, KEYS[2] destination; ARGV[1], ARGV[2] the ends (LEFT/RIGHT) to take
# from and push to. Moves the whole list, one LMOVE at a time, atomically; returns how many.
MOVE_ALL = (
    _HEADER
    + """
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], ARGV[1], ARGV[2]) do
  moved = moved + 1
end
return moved
"""
)

# KEYS[1] source list, KEYS[2] destination; ARGV[1] how many at most, ARGV[2], ARGV[3] the
# ends. Moves up to that many elements, one LMOVE at a time, atomically; returns how many.
MOVE_SOME = (
    _HEADER
    + """
local moved = 0
for _ = 1, tonumber(ARGV[1]) do
  if not redis.call('LMOVE', KEYS[1], KEYS[2], ARGV[2], ARGV[3]) then break end
  moved = moved + 1
end
return moved
"""
)

# KEYS[1] source list, KEYS[2] claim list; ARGV[1] an element. Moves one element equal to it
# from the source to the tail of the claim list; returns 1, or 0 when the source holds none
# (taken meanwhile by another).
CLAIM_ONE = (
    _HEADER
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
)

# KEYS[1] a key; ARGV[1] its value. A plain SET of the worker's own (xapi.last_delivery): a few
# bytes replaced, so it need not be refused at maxmemory while the worker drains.
SET_VALUE = _HEADER + "return redis.call('SET', KEYS[1], ARGV[1])\n"

# KEYS[1] a hash; ARGV field, value pairs. A node's spool state (a few fields replaced).
SET_FIELDS = _HEADER + "return redis.call('HSET', KEYS[1], unpack(ARGV))\n"

# KEYS[1] a set; ARGV[1] a member (an exchange binding).
ADD_MEMBER = _HEADER + "return redis.call('SADD', KEYS[1], ARGV[1])\n"


class Scripts:
    """The scripts above, registered on one client (redis-py loads them on first use)."""

    def __init__(self, client: redis.Redis) -> None:
        self.take = client.register_script(TAKE)
        self.hand_over = client.register_script(HAND_OVER)
        self.heartbeat = client.register_script(HEARTBEAT)
        self.push = client.register_script(PUSH)
        self.restore = client.register_script(RESTORE)
        self.ack = client.register_script(ACK)
        self.set_aside = client.register_script(SET_ASIDE)
        self.add_member = client.register_script(ADD_MEMBER)


def move_all(client: redis.Redis, source: str, destination: str, src: str, dst: str) -> int:
    """Move every element of list ``source`` to ``destination`` (LMOVE src dst), at
    ``maxmemory`` too."""
    script = client.register_script(MOVE_ALL)
    return int(script(keys=[source, destination], args=[src, dst], client=client))


def move_some(
    client: redis.Redis, source: str, destination: str, most: int, src: str, dst: str
) -> int:
    """Move up to ``most`` elements of list ``source`` to ``destination`` (LMOVE src dst),
    atomically, at ``maxmemory`` too."""
    script = client.register_script(MOVE_SOME)
    return int(script(keys=[source, destination], args=[most, src, dst], client=client))


def claim_one(client: redis.Redis, source: str, claim: str, value: bytes) -> bool:
    """Move one element equal to ``value`` from list ``source`` to list ``claim``, at
    ``maxmemory`` too; False when ``source`` holds none."""
    script = client.register_script(CLAIM_ONE)
    return bool(script(keys=[source, claim], args=[value], client=client))


def push(client: redis.Redis, key: str, values: list[Any], left: bool = True) -> int:
    """LPUSH (or RPUSH) ``values`` onto ``key``, at ``maxmemory`` too."""
    script = client.register_script(PUSH)
    return int(script(keys=[key], args=["left" if left else "right", *values], client=client))


def set_value(client: redis.Redis, key: str, value: str) -> None:
    """SET ``key`` to ``value``, at ``maxmemory`` too."""
    client.register_script(SET_VALUE)(keys=[key], args=[value], client=client)


def set_fields(client: redis.Redis, key: str, values: dict[str, str]) -> None:
    """HSET ``values`` into hash ``key``, at ``maxmemory`` too."""
    args = [x for pair in values.items() for x in pair]
    client.register_script(SET_FIELDS)(keys=[key], args=args, client=client)


def is_oom(exc: BaseException) -> bool:
    """An ``-OOM`` refusal (redis-py raises OutOfMemoryError, or a ResponseError inside a
    pipeline or a script)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "OOM" in str(exc).split(" ", 1)[0]
    )
