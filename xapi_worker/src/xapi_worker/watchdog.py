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

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("xapi_worker.watchdog")

#: A broker poll (BLMOVE with a 1 s timeout) unanswered for this long means a stuck consumer.
STUCK_AFTER = 30.0
#: The longest a piece of the start (:func:`kept_alive`) keeps the watchdog fed: the spool's
#: whole check after a damage, or its migration, at its 10 GiB limit on a slow disk take
#: minutes; a disk that hangs longer gets the worker restarted.
KEEP_ALIVE_MAX = 1800.0


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


@contextlib.contextmanager
def kept_alive(what: str, longest: float = KEEP_ALIVE_MAX) -> Iterator[None]:
    """Around work of the worker's start that runs before Celery's loop feeds the watchdog
    (the spool's migration, its whole check after a damage: minutes on a large spool; the
    unit's watchdog counts from the exec): ``WATCHDOG=1`` from a thread every
    :func:`interval`, for at most ``longest`` seconds, and a line in the log each minute.
    Without a watchdog (a command, a test), nothing."""
    every = interval()
    if every is None:
        yield
        return
    done = threading.Event()
    began = time.monotonic()

    def ping() -> None:
        said = 0.0
        while not done.wait(every):
            elapsed = time.monotonic() - began
            if elapsed > longest:
                log.error(
                    "%s: still running after %.0f s: watchdog not fed any more, systemd will "
                    "restart this worker",
                    what,
                    elapsed,
                )
                return
            notify("WATCHDOG=1")
            if elapsed - said >= 60:
                said = elapsed
                log.warning("%s: still running after %.0f s", what, elapsed)

    thread = threading.Thread(target=ping, name="xapi-watchdog-start", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


__all__ = ["KEEP_ALIVE_MAX", "STUCK_AFTER", "feeder", "interval", "kept_alive", "notify"]
