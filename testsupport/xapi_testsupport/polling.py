"""Polling until something is true: the one helper the molecule scenarios' tests, the worker's
tests and the benchmark all wait with (services, stores and local processes take their
time; only the interval differs, 1 s on lab hosts, 0.1 s for local processes)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 1.0) -> bool:
    """True as soon as ``predicate()`` is; False if it still is not after ``timeout`` s
    (checked once more at the deadline, so a slow last poll is not a false failure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
