"""The worker's redis-py clients, safe across a fork.

The worker's main process makes its Processor (and with it the dead letters' and the
metrics' clients) before Celery forks the pool processes. A connection made before a fork
belongs to the parent: a child that used it would share its socket. :class:`ForkSafeRedis`
builds its client in the process that uses it, again after a fork.
"""

from __future__ import annotations

import os

import redis


class ForkSafeRedis:
    """A redis-py client on ``url``, built on first use in each process."""

    def __init__(self, url: str, timeout: float, connect_timeout: float | None = None) -> None:
        self._url = url
        self._timeout = timeout
        self._connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._client: redis.Redis | None = None
        self._pid = 0

    def get(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._connect_timeout,
            )
            self._pid = os.getpid()
        return self._client
