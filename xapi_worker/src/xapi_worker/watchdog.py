"""systemd's watchdog, fed from Celery's event loop while the consumer makes progress.

The unit sets ``WatchdogSec=``; systemd then passes ``WATCHDOG_USEC`` and ``NOTIFY_SOCKET``
and restarts the worker when no ``WATCHDOG=1`` arrives in time. The ping is sent from a timer
of the worker's event loop, and only while no poll of the broker has been waiting for its
answer longer than :data:`STUCK_AFTER`: a loop that is blocked, or a consumer waiting on a
connection that will never answer (a hung broker), stops the pings and gets restarted, where
before it stayed alive and consumed nothing.

The notification protocol is one datagram on a Unix socket (sd_notify(3)); this is the whole
of it, which is why no library is used for it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable

log = logging.getLogger("xapi_worker.watchdog")

#: A broker poll (BLMOVE with a 1 s timeout) unanswered for this long means a stuck consumer.
STUCK_AFTER = 30.0


def interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between pings (a third of the watchdog timeout), or None without a watchdog."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or not env.get("NOTIFY_SOCKET"):
        return None
    if pid and pid != str(os.getpid()):  # meant for another process (a pool child)
        return None
    return max(int(usec) / 1e6 / 3, 0.5)


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        log.warning("cannot notify systemd at %s", address, exc_info=True)
        return False
    return True


def feeder(waits: Callable[[], Iterable[float]]) -> Callable[[], None]:
    """A timer callback: ping unless one of ``waits()`` (seconds each pending poll has been
    waiting for its answer) exceeds STUCK_AFTER."""
    state = {"warned": False}

    def feed() -> None:
        longest = max(waits(), default=0.0)
        if longest > STUCK_AFTER:
            if not state["warned"]:
                log.error(
                    "no answer from the broker for %.0f s: watchdog not fed, systemd will "
                    "restart this worker",
                    longest,
                )
                state["warned"] = True
            return
        state["warned"] = False
        notify("WATCHDOG=1")

    return feed


__all__ = ["STUCK_AFTER", "feeder", "interval", "notify"]
