"""What a damaged spool still holds, delivered: ``xapi-worker spool drain`` reads the rows of
each file the worker set aside (``<node>.sqlite3.damaged-<time>``, spool.py) that SQLite can
still read, puts them in the node's spool, where they are delivered like any other (each
statement keeps its id, so the LRS stores it once), and renames the file
``<name>.salvaged`` so that they are not taken twice. Killed in between, a salvage run again
takes none of the rows already in the spool (their progress is committed with them).

The set-aside file is only read (a read-only connection): a damaged file is not written to.
Rows are read in id order a chunk at a time; a chunk SQLite cannot read is read again row by
row, so one damaged page costs the rows it holds, not the rest of the file. What could not be
read is counted and said; the file is then kept (``.salvaged``) for inspection.

The dead letters the file holds (format 4, deadstore.py) go to the node's dead letters, each
once however often this runs (deadstore.DiskDeadLetters.add_raw).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.request import pathname2url

from .content import printable
from .deadstore import DiskDeadLetters
from .spool import SALVAGED, Entry, Spool, SpoolError, connect

log = logging.getLogger("xapi_worker.spool")

#: Rows read (and spooled, one transaction) at a time.
CHUNK = 500
#: Without a readable highest id, row-by-row reading gives up this many ids past a damage.
BLIND_IDS = 100_000

_WANTED = (
    "id",
    "statement",
    "task_id",
    "attempts",
    "first_seen",
    "last_error",
    "lone_failures",
)


@dataclass
class Salvage:
    """What became of one set-aside file."""

    path: Path
    moved: int = 0  # statements now in the node's spool
    dead_letters: int = 0  # dead letters now in the node's
    unreadable: int = 0  # rows SQLite could not read, or whose statement is not a JSON object
    error: str = ""  # why it stopped (nothing read, the node's spool full): the file stays
    kept_as: Path | None = None  # renamed once salvaged

    def line(self) -> str:
        text = f"{self.path.name}: {self.moved} statements put in the node's spool"
        if self.dead_letters:
            text += f", {self.dead_letters} dead letters in its dead letters"
        if self.unreadable:
            text += f", {self.unreadable} rows unreadable"
        if self.error:
            text += f"; stopped: {self.error} (the file stays set aside)"
        elif self.kept_as is not None:
            text += f"; kept as {self.kept_as.name}"
        return text


def _read_only(path: Path) -> sqlite3.Connection:
    return connect(f"file:{pathname2url(str(path))}?mode=ro", uri=True)


class _Reader:
    """The readable rows of a set-aside file, as spool Entries, due now."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        present = {r[1] for r in conn.execute("PRAGMA table_info(spool)")}
        missing = {"id", "statement", "task_id"} - present
        if missing:
            raise sqlite3.DatabaseError(f"no spool table with {', '.join(sorted(missing))}")
        # A file of format 1 has no lone_failures: 0.
        self.select = ", ".join(c if c in present else "0" for c in _WANTED)
        self.unreadable = 0
        self.last = self._highest()

    def _highest(self) -> int | None:
        for query in (
            "SELECT seq FROM sqlite_sequence WHERE name = 'spool'",
            "SELECT max(id) FROM spool",
        ):
            try:
                row = self.conn.execute(query).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row and row[0] is not None:
                return int(row[0])
        return None

    def _entry(self, row: tuple[object, ...], now: float) -> Entry | None:
        _id, text, task_id, attempts, first_seen, last_error, lone = row
        try:
            statement = json.loads(str(text))
        except ValueError:
            statement = None
        if not isinstance(statement, dict):
            self.unreadable += 1
            return None
        return Entry(
            statement=statement,
            task_id=str(task_id),
            attempts=int(attempts or 1),  # type: ignore[call-overload]
            first_seen=float(first_seen or now),  # type: ignore[arg-type]
            next_at=now,
            last_error=printable(str(last_error or "")),
            lone_failures=int(lone or 0),  # type: ignore[call-overload]
        )

    def chunks(self, after: int = 0) -> Iterator[tuple[list[Entry], int]]:
        """The readable rows whose id is above ``after``, a chunk at a time, each with the
        last id it covers."""
        query = f"SELECT {self.select} FROM spool WHERE id > ? ORDER BY id LIMIT ?"  # noqa: S608
        while True:
            now = time.time()
            try:
                rows = self.conn.execute(query, (after, CHUNK)).fetchall()
            except sqlite3.DatabaseError:
                rows, after = self._row_by_row(after)
                if not rows:
                    return
            if not rows:
                return
            after = max(after, int(rows[-1][0]))  # type: ignore[call-overload]
            yield [e for e in (self._entry(r, now) for r in rows) if e is not None], after

    def _row_by_row(self, after: int) -> tuple[list[tuple[object, ...]], int]:
        """Past a damage: ids one by one, up to the first readable chunk's worth of rows.
        Returns those rows and the last id tried."""
        query = f"SELECT {self.select} FROM spool WHERE id = ?"  # noqa: S608
        end = self.last if self.last is not None else after + BLIND_IDS
        rows: list[tuple[object, ...]] = []
        current = after
        while current < end and len(rows) < CHUNK:
            current += 1
            try:
                row = self.conn.execute(query, (current,)).fetchone()
            except sqlite3.DatabaseError:
                self.unreadable += 1
                continue
            if row is not None:
                rows.append(row)
        return rows, current


def _dead_letters(conn: sqlite3.Connection) -> Iterator[list[bytes]]:
    """The readable dead letters of a set-aside file (none before format 4), a chunk at a
    time; a chunk SQLite cannot read is skipped row by row."""
    if not conn.execute("PRAGMA table_info(dead_letters)").fetchall():
        return
    after = 0
    while True:
        try:
            rows = conn.execute(
                "SELECT id, entry FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?",
                (after, CHUNK),
            ).fetchall()
        except sqlite3.DatabaseError:
            rows = []
            for current in range(after + 1, after + 1 + CHUNK):
                with contextlib.suppress(sqlite3.DatabaseError):
                    row = conn.execute(
                        "SELECT id, entry FROM dead_letters WHERE id = ?", (current,)
                    ).fetchone()
                    if row is not None:
                        rows.append(row)
            if not rows:
                return
        if not rows:
            return
        after = int(rows[-1][0])
        yield [bytes(r[1]) if isinstance(r[1], bytes) else str(r[1]).encode() for r in rows]


def salvage(path: Path, spool: Spool, dead: DiskDeadLetters | None = None) -> Salvage:
    """Put the readable rows of the set-aside file ``path`` into ``spool`` (its node's), and
    its dead letters into ``dead`` (the node's), then rename it ``<name>.salvaged``. Never
    raises on the file's content: what went wrong is in the result."""
    result = Salvage(path)
    try:
        conn = _read_only(path)
    except sqlite3.Error as exc:
        result.error = f"cannot be read: {type(exc).__name__}: {exc}"
        return result
    try:
        reader = _Reader(conn)
        # A salvage killed earlier: the rows it committed are not taken again.
        for entries, last in reader.chunks(spool.salvaged_up_to(path.name)):
            spool.add(entries, source="the set-aside file", progress=(path.name, last))
            result.moved += len(entries)
        result.unreadable = reader.unreadable
        if dead is not None:
            for raws in _dead_letters(conn):
                result.dead_letters += dead.add_raw(raws)
    except SpoolError as exc:
        result.error = str(exc)
        return result
    except sqlite3.DatabaseError as exc:
        result.error = f"cannot be read: {type(exc).__name__}: {exc}"
        return result
    finally:
        conn.close()
    target = Path(f"{path}{SALVAGED}")
    for suffix in ("-wal", "-shm", ""):  # the file last: its WAL never left behind it
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(f"{target}{suffix}")
    result.kept_as = target
    log.warning("spool: %s", result.line())
    return result
