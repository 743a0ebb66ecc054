"""Headers come with the message, and any message can arrive (the producer's ACL user writes
them): counts and times a header carries are bounded before they reach the spool, a dead
letter or a re-publish, so that one message can never hold its batch."""

from __future__ import annotations

import time

import pytest
from xapi_worker.bookkeeping import COUNT_MAX as HEADER_COUNT_MAX
from xapi_worker.bookkeeping import count as _int
from xapi_worker.delivery import iso, parse_iso
from xapi_worker.spool import Entry, Spool, SpoolError


@pytest.mark.parametrize("value", [10**30, str(10**30), 2**63])
def test_a_huge_count_is_bounded(value: object) -> None:
    assert _int(value, 1) == HEADER_COUNT_MAX
    assert _int(value, 0, minimum=0) == HEADER_COUNT_MAX


@pytest.mark.parametrize(
    "value",
    ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "1969-12-31T00:00:00+00:00"],
)
def test_a_time_iso_cannot_write_back_is_no_time(value: str) -> None:
    assert parse_iso(value) is None


def test_a_plain_time_reads_back() -> None:
    now = round(time.time(), 3)
    assert parse_iso(iso(now)) == pytest.approx(now)


def test_a_count_sqlite_cannot_hold_is_a_spool_error(tmp_path) -> None:
    """Nothing written, and the caller's error is the spool's (not an OverflowError that
    would put the whole batch back again and again)."""
    spool = Spool(tmp_path, "n@host")
    entry = Entry({"id": "x"}, "task", 10**30, time.time(), time.time())
    with pytest.raises(SpoolError):
        spool.add([entry])
    assert spool.stats().depth == 0
