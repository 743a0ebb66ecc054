"""The dead letters of a worker node, on its host's disk: a table of the node's spool file
(spool.py, format 4), with the file's protections (0600 in the worker's own directory,
commits fsync-ed, the checks at open and the set-aside of a damaged file).

Why not the broker: a dead letter kept in Redis takes the broker's memory, which is bounded
(``maxmemory``, ``noeviction``) and shared with Pod's producer. A dead letter replaces the
message it settles, so the worker writes it at ``maxmemory`` too: a full broker grew by every
dead letter, and Pod was refused for as long as they stayed (3,000 expired rows of a drain
took a full 3 MiB broker to 7.26 MiB). Here they take the disk, bounded and counted.

Bounded: by ``XAPI_WORKER_DEAD_LETTER_MAX_MB``, what each dead letter takes counted as its
JSON's bytes plus :data:`spool.ROW_OVERHEAD_BYTES` (summed by triggers: no scan), and by the
spool file's own limit (``XAPI_WORKER_SPOOL_MAX_MB``, which covers the whole file). When a
dead letter does not fit, the expired ones (written more than the retention ago) are deleted
first, oldest first; if it still does not fit it is refused (:class:`DeadLettersFull`):
nothing is dropped, the message stays in the broker (a spooled row stays in the spool), and
the node's drainer stops the node taking from the broker (drain.py: CRITICAL in the log,
``full`` and ``dead_full`` in its state, so ``check_xapi`` is CRITICAL) until the dead
letters have room again: replayed, purged, or expired.

The broker's list (``XAPI_WORKER_DEAD_LETTER_KEY``), where dead letters were kept before
this format and where a node without a spool still keeps them, is moved here by the drainer
of each node with a spool (:func:`move_legacy`), exactly once whatever stops it: a chunk is
claimed by one script to the node's own list (``<in-flight list>.dead_letters``: two nodes
never take the same element), committed here with its SHA-256 as ``origin`` (unique: a
commit made again adds nothing), and only then is the claim list deleted. A kill between
the steps leaves the claim list, which the next turn commits first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .content import json_text
from .delivery import parse_iso
from .scripts import move_all, move_some
from .settings import Settings
from .spool import (
    RESUME_SHARE,
    ROW_OVERHEAD_BYTES,
    Spool,
    SpoolError,
    SpoolFull,
    batch_bytes,
    free_bytes,
    room,
)

log = logging.getLogger("xapi_worker.deadletters")

#: Dead letters read, deleted or moved at a time.
CHUNK = 200
#: A dead letter counts as new for this long after it was written (``dead_new`` in the
#: node's state, as check_xapi's default ``dead_window``).
NEW_WINDOW_SECONDS = 86400.0
#: Elements of the broker's list moved to the disk per turn of the drainer.
MOVE_PER_TURN = 1000


class DeadLettersFull(SpoolFull):
    """The node's dead letters are at their limit, the expired ones deleted already: this
    one is refused (its message stays where it is)."""


@dataclass(frozen=True)
class DeadStats:
    """A node's dead letters in a few numbers, read without a scan (the count and bytes the
    triggers keep, the oldest from the index, the new ones an index range)."""

    count: int
    bytes: int
    max_bytes: int
    new: int  # written in the last NEW_WINDOW_SECONDS
    oldest: float | None  # when the oldest one was written (epoch seconds)
    headroom: int = 0  # the most one batch can write: spool.batch_bytes()

    @property
    def full(self) -> bool:
        """Less room than one batch of the largest dead letters: the node stops taking."""
        return self.max_bytes - self.bytes < self.headroom

    @property
    def roomy(self) -> bool:
        """A full store takes again (hysteresis: well away from where it stopped)."""
        return self.bytes < self.max_bytes * RESUME_SHARE and not self.full


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count FROM dead_letter_size").fetchone()[0])


def _blob(entry: dict[str, Any]) -> bytes:
    # json_text: any content can be written (UTF-8 always encodes it), never raises.
    return json_text(entry).encode("utf-8")


def read_entry(raw: bytes) -> dict[str, Any]:
    """A stored dead letter as listed (an element that is no JSON object as ``unparsable``)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        return value
    return {"unparsable": bytes(raw).decode("utf-8", "replace")}


def entry_time(raw: bytes, default: float) -> float:
    """When a dead letter was written: its ``time``, else ``default``."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return default
    written = parse_iso(value.get("time")) if isinstance(value, dict) else None
    return default if written is None else written


class DiskDeadLetters:
    """The dead letters of one node's spool file. Every method may raise
    :class:`spool.SpoolError` (or sqlite3's errors for reads) as the spool's do."""

    def __init__(
        self, spool: Spool, max_bytes: int, retention_days: float = 0, batch_size: int = 100
    ) -> None:
        self.spool = spool
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self.batch_size = batch_size  # with the spool's statement_bytes: the headroom

    def __repr__(self) -> str:
        return f"DiskDeadLetters({str(self.spool.path)!r})"

    # --- writes -------------------------------------------------------------------------------
    def add(
        self,
        entries: Sequence[dict[str, Any]],
        now: float | None = None,
        settles: Sequence[int] = (),
    ) -> bool:
        """Write these dead letters (each as DeadLetter.entry() makes it), committed to disk
        on return; raise :class:`DeadLettersFull` or :class:`spool.SpoolError` (nothing
        written) when they cannot be.

        ``settles``: the ids of the spooled rows these dead letters settle (the drainer's),
        deleted from the spool in the same transaction, so that a row is gone once its dead
        letter is written, whatever stops the drainer next (a kill, a reschedule of another
        row that fails). When none of them is still spooled (another process, ``spool
        drain`` beside the node, settled them meanwhile), nothing is written and False is
        returned: a row never has two dead letters."""
        now = time.time() if now is None else now
        rows = [(blob, now, len(blob) + ROW_OVERHEAD_BYTES, None) for blob in map(_blob, entries)]
        return self._insert(rows, now, settles) > 0 or not settles

    def add_raw(self, raws: Sequence[bytes], now: float | None = None) -> int:
        """Elements of the broker's list, as they are (bytes), each once whatever the number
        of calls (``origin``: its SHA-256); returns how many were new."""
        now = time.time() if now is None else now
        rows = [
            (
                bytes(raw),
                # Never later than now: one written by a node whose clock was ahead would
                # otherwise outlive its retention by as much (for ever for a year 2099).
                min(entry_time(raw, now), now),
                len(raw) + ROW_OVERHEAD_BYTES,
                hashlib.sha256(raw).hexdigest(),
            )
            for raw in raws
        ]
        return self._insert(rows, now)

    def _insert(
        self,
        rows: Sequence[tuple[bytes, float, int, str | None]],
        now: float,
        settles: Sequence[int] = (),
    ) -> int:
        """Insert ``rows``; returns how many were new (0 too when ``settles`` named rows of
        the spool of which none was left: nothing inserted)."""
        if not rows:
            return 0
        incoming = sum(r[2] for r in rows)
        try:
            # The file's own limit and the disk's reserve, as the spool's add().
            if incoming > room(
                self.spool.used_bytes(), self.spool.max_bytes, free_bytes(self.spool.directory)
            ):
                raise SpoolFull(
                    f"spool {self.spool.path} is full or its disk is: {len(rows)} dead letters "
                    "not written"
                )
            with self.spool.transaction() as conn:
                if settles and not sum(
                    conn.execute("DELETE FROM spool WHERE id = ?", (i,)).rowcount for i in settles
                ):
                    return 0
                used = int(conn.execute("SELECT bytes FROM dead_letter_size").fetchone()[0])
                expired = 0
                if used + incoming > self.max_bytes:
                    freed, expired = self._make_room(conn, used + incoming - self.max_bytes, now)
                    used -= freed
                if used + incoming > self.max_bytes:
                    raise DeadLettersFull(
                        f"dead letters of {self.spool.path} at their limit "
                        f"({self.max_bytes // 1024**2} MiB, XAPI_WORKER_DEAD_LETTER_MAX_MB, "
                        f"none expired): {len(rows)} not written"
                    )
                before = _count(conn)
                conn.executemany(
                    "INSERT OR IGNORE INTO dead_letters (entry, written_at, bytes, origin)"
                    " VALUES (?,?,?,?)",
                    rows,
                )
                added = _count(conn) - before
        except SpoolError:
            raise
        except (sqlite3.Error, ValueError, OverflowError) as exc:
            # disk full, I/O error, locked for too long; a value SQLite cannot hold
            raise SpoolError(
                f"dead letters of {self.spool.path}: {type(exc).__name__}: {exc}"
            ) from exc
        if expired:
            log.warning(
                "dead letters of %s at their limit: %d expired ones (older than %g days) "
                "deleted before the hourly retention, to make room",
                self.spool.path,
                expired,
                self.retention_days,
            )
        return added

    def _make_room(self, conn: sqlite3.Connection, needed: int, now: float) -> tuple[int, int]:
        """Delete expired dead letters, oldest first, until ``needed`` bytes are free or none
        is left expired; returns the bytes freed and how many were deleted."""
        if not self.retention_days:
            return 0, 0
        limit = now - self.retention_days * 86400
        freed = deleted = 0
        while freed < needed:
            rows = conn.execute(
                "SELECT id, bytes FROM dead_letters WHERE written_at < ?"
                " ORDER BY written_at LIMIT ?",
                (limit, CHUNK),
            ).fetchall()
            if not rows:
                break
            for row_id, size in rows:
                conn.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))
                freed += int(size)
                deleted += 1
                if freed >= needed:
                    break
        return freed, deleted

    def delete(self, ids: Sequence[int], secure: bool = False) -> int:
        """Delete these dead letters; ``secure`` (a learner's erasure): their content is
        overwritten in the file, and the WAL checkpointed (as Spool.erase)."""
        if not ids:
            return 0
        if secure:
            with self.spool.reading() as conn:
                conn.execute("PRAGMA secure_delete = ON")
        with self.spool.transaction() as conn:
            deleted = sum(
                conn.execute("DELETE FROM dead_letters WHERE id = ?", (i,)).rowcount for i in ids
            )
        if secure:
            with self.spool.reading() as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def purge_older(self, days: float, now: float | None = None) -> int:
        """Delete those written more than ``days`` ago, oldest first, a chunk per
        transaction (the index of written_at: never the table read whole)."""
        limit = (time.time() if now is None else now) - days * 86400
        removed = 0
        while True:
            with self.spool.transaction() as conn:
                gone = conn.execute(
                    "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                    " WHERE written_at < ? ORDER BY written_at LIMIT ?)",
                    (limit, CHUNK),
                ).rowcount
            removed += gone
            if gone < CHUNK:
                return removed

    def purge(self) -> int:
        """Delete every dead letter of this node."""
        with self.spool.transaction() as conn:
            count = int(conn.execute("SELECT count FROM dead_letter_size").fetchone()[0])
            conn.execute("DELETE FROM dead_letters")
        return count

    # --- reads --------------------------------------------------------------------------------
    def rows(self, limit: int = -1, after: int = 0) -> list[tuple[int, bytes]]:
        """(id, stored bytes), in the order they were written, from ``after`` on."""
        with self.spool.reading() as conn:
            fetched = conn.execute(
                "SELECT id, entry FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(int(i), bytes(e)) for i, e in fetched]

    def entries(self, limit: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """(id, dead letter) in the order they were written, at most ``limit`` (0: all),
        read a chunk at a time."""
        out: list[tuple[int, dict[str, Any]]] = []
        after = 0
        while not limit or len(out) < limit:
            want = CHUNK if not limit else min(CHUNK, limit - len(out))
            rows = self.rows(want, after)
            if not rows:
                break
            out.extend((i, read_entry(raw)) for i, raw in rows)
            after = rows[-1][0]
        return out

    def stats(self, now: float | None = None, counts: bool = True) -> DeadStats:
        """``counts`` False: count and bytes only (``new`` 0, ``oldest`` None), for the
        drainer's look between two batches."""
        now = time.time() if now is None else now
        oldest, new = None, 0
        with self.spool.reading() as conn:
            count, used = conn.execute("SELECT count, bytes FROM dead_letter_size").fetchone()
            if counts:
                oldest = conn.execute("SELECT min(written_at) FROM dead_letters").fetchone()[0]
                new = conn.execute(
                    "SELECT count(*) FROM dead_letters WHERE written_at >= ?",
                    (now - NEW_WINDOW_SECONDS,),
                ).fetchone()[0]
        return DeadStats(
            count=int(count),
            bytes=int(used),
            max_bytes=self.max_bytes,
            new=int(new),
            oldest=None if oldest is None else float(oldest),
            headroom=batch_bytes(self.batch_size, self.spool.statement_bytes),
        )


def disk_dead_letters(spool: Spool, settings: Settings) -> DiskDeadLetters:
    """The dead letters of ``spool``'s node, with the settings' limit and retention."""
    return DiskDeadLetters(
        spool,
        settings.dead_letter_max_mb * 1024**2,
        settings.dead_letter_retention_days,
        settings.batch_size,
    )


def move_room(store: DiskDeadLetters) -> int:
    """Bytes of the broker's dead letters ``store`` may still take in (:func:`move_legacy`):
    up to one batch's headroom below where a full store takes again (DeadStats.roomy), so
    that the move never makes a node's dead letters full and stop the node taking (the
    dead letters harm nothing where they are, in the broker's list)."""
    stats = store.stats(counts=False)
    return int(stats.max_bytes * RESUME_SHARE) - stats.headroom - stats.bytes


def move_legacy(
    client: redis.Redis,
    legacy: str,
    claim: str,
    store: DiskDeadLetters,
    most: int = MOVE_PER_TURN,
    roomy: bool = False,
) -> int:
    """Move up to ``most`` elements of the broker's list ``legacy`` to ``store``, through the
    node's claim list ``claim`` (see the module's docstring); what the claim list holds from
    a run that was stopped is committed first. Returns how many elements left the broker
    (those of a stopped run, committed already, are not added twice). When the store is
    full, what is claimed goes back to the head of ``legacy`` and DeadLettersFull is
    raised. ``roomy`` (the drainer's): each chunk claims only the elements that fit in
    :func:`move_room`, and the move stops at the first that does not: the rest stays in
    ``legacy``."""
    added = moved = 0
    while moved < most:
        pending: list[bytes] = client.lrange(claim, 0, -1)  # type: ignore[assignment]
        if not pending:
            want = min(CHUNK, most - moved)
            if roomy:
                want = _fitting(client.lrange(legacy, 0, want - 1), move_room(store))  # type: ignore[arg-type]
                if not want:
                    break
            if not move_some(client, legacy, claim, want, "LEFT", "RIGHT"):
                break
            pending = client.lrange(claim, 0, -1)  # type: ignore[assignment]
        try:
            added += store.add_raw(pending)
        except SpoolFull:
            # Back where they were, in their order, at the head (the oldest end).
            move_all(client, claim, legacy, "RIGHT", "LEFT")
            raise
        client.delete(claim)
        moved += len(pending)
    if added:
        log.warning("%d dead letters moved from the broker's %s to %s", added, legacy, store)
    return moved


def _fitting(head: Sequence[bytes], room_bytes: int) -> int:
    """How many of ``head``'s elements, from the first, fit in ``room_bytes`` on disk."""
    fits = 0
    for raw in head:
        room_bytes -= len(raw) + ROW_OVERHEAD_BYTES
        if room_bytes < 0:
            break
        fits += 1
    return fits
