"""Polling a lab host until something is true: shared by the molecule scenarios' tests and
the benchmark, which all wait on services and stores that take their time."""

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
