"""The durable spool of one worker node: statements the LRS could not take yet, on the
encoding host's disk, in an SQLite database (WAL mode, ``synchronous=FULL``).

Why: a statement waiting in Redis takes about 3 kB of the broker's memory, which is bounded
(``maxmemory``, ``noeviction``); once it is full, Pod's producers are refused and the
statements of that moment are lost. The spool moves what the LRS refuses for now from the
broker's memory to the encoding host's disk, so an outage of the LRS is bounded by the disk
instead. A message is acknowledged only once its statement is committed here (the commit is
``fsync``-ed), and a spooled statement is deleted only once the LRS holds it.

One file per node (``<node>.sqlite3``, its ``-wal`` and ``-shm`` beside it), written by the
node's pool process (what it could not deliver) and by its drainer thread (delivery from the
spool). SQLite's locking serialises them; ``busy_timeout`` makes one wait for the other.

Personal data: statements carry learners' identities. The directory is the worker user's
only (0700, the role's), and the files are created 0600 whatever the umask.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .content import json_text, printable

log = logging.getLogger("xapi_worker.spool")

#: The documented maximum of an automatic size limit, and its share of the free disk.
AUTO_MAX_BYTES = 10 * 1024**3
AUTO_SHARE = 0.25
#: Below this much room (under its limit, or above the disk's reserve) the spool counts as
#: full and the node stops taking: a batch's worth, roughly, which add() still accepts.
HEADROOM_BYTES = 1024**2
#: A full spool takes again below this share of its limit, and with this much room above the
#: disk's reserve: far enough from where it stopped that it does not stop again at once.
RESUME_SHARE = 0.9
RESUME_DISK_BYTES = 8 * 1024**2
#: Free space the spool leaves on its filesystem: below it the spool counts as full, whatever
#: its own size, so a disk filled by something else (an encoding's ffmpeg) stops the node
#: taking instead of failing every write. SQLite needs room for the WAL and a checkpoint.
DISK_RESERVE_BYTES = 16 * 1024**2
#: Waiting for the other writer (pool process or drainer) before giving up, milliseconds.
BUSY_TIMEOUT_MS = 10_000
SCHEMA_VERSION = 2
AUTO_VACUUM_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
#: The drainer, idle, compacts the spool once it could give back more than this.
SHRINK_ABOVE_BYTES = 512 * 1024
WAL_LIMIT_BYTES = 4 * 1024**2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    statement_id TEXT NOT NULL,
    statement TEXT NOT NULL,
    task_id TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    spooled_at REAL NOT NULL,
    next_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    lone_failures INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS spool_due ON spool (next_at, id);
"""


_COLUMNS = (
    "id, statement, task_id, attempts, first_seen, spooled_at, next_at, last_error, lone_failures"
)
#: Version 1 (before lone_failures) to 2, in place.
_MIGRATE_1 = "ALTER TABLE spool ADD COLUMN lone_failures INTEGER NOT NULL DEFAULT 0"


class SpoolError(Exception):
    """The spool cannot take these statements now (full, disk full, I/O error): the caller
    keeps them where they are (the messages go back to the broker)."""


class SpoolFull(SpoolError):
    pass


@dataclass(frozen=True)
class Entry:
    """One statement to spool."""

    statement: dict[str, Any]
    task_id: str
    attempts: int
    first_seen: float
    next_at: float
    last_error: str = ""
    lone_failures: int = 0  # see delivery.deliver()


@dataclass(frozen=True)
class Row:
    """One spooled statement, as read back."""

    id: int
    statement: dict[str, Any]
    task_id: str
    attempts: int
    first_seen: float
    spooled_at: float
    next_at: float
    last_error: str
    lone_failures: int = 0


@dataclass(frozen=True)
class Stats:
    depth: int
    oldest: float | None  # first_seen of the oldest spooled statement
    used_bytes: int
    max_bytes: int
    damaged: int
    free_bytes: int  # free space of the spool's filesystem

    # The one rule of a full spool, with add()'s refusal (room()) and its hysteresis.
    @property
    def room(self) -> int:
        return room(self.used_bytes, self.max_bytes, self.free_bytes)

    @property
    def disk_full(self) -> bool:
        """The disk, not the spool's limit, is what is short of room."""
        return self.free_bytes - DISK_RESERVE_BYTES < headroom(self.max_bytes)

    @property
    def full(self) -> bool:
        """The node stops taking: less room than a batch's worth, which add() would still
        take, so a node that takes never meets add()'s refusal with a batch that size."""
        return self.room < headroom(self.max_bytes)

    @property
    def roomy(self) -> bool:
        """A full spool takes again (hysteresis: well away from where it stopped)."""
        return (
            self.used_bytes < self.max_bytes * RESUME_SHARE
            and self.free_bytes - DISK_RESERVE_BYTES >= RESUME_DISK_BYTES
            and not self.full
        )


#: SQLite's primary result codes that mean a damaged file: SQLITE_CORRUPT, SQLITE_NOTADB.
DAMAGE_CODES = frozenset({11, 26})


def damage(exc: sqlite3.DatabaseError) -> bool:
    """An error that says the file itself is damaged (not a full disk, an I/O error, a
    lock): only then is a spool set aside."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11 and later
    if code is None:
        text = str(exc).lower()
        return "malformed" in text or "not a database" in text
    return int(code) & 0xFF in DAMAGE_CODES


def headroom(max_bytes: int) -> int:
    """Room kept free: a spool this close to its limit counts as full (about a batch)."""
    return min(HEADROOM_BYTES, max_bytes // 8)


def room(used_bytes: int, max_bytes: int, free: int) -> int:
    """Bytes the spool may still write: up to its limit, never into the disk's reserve
    (:data:`DISK_RESERVE_BYTES`). add() refuses more; Stats.full stops the node taking
    before."""
    return min(max_bytes - used_bytes, free - DISK_RESERVE_BYTES)


def node_file(node: str) -> str:
    """The file name of a node's spool: the node name (``xapi@host``) with anything but
    letters, digits, ``@``, ``.``, ``_`` and ``-`` replaced, so it stays one plain name."""
    return re.sub(r"[^A-Za-z0-9@._-]", "_", node) + ".sqlite3"


def free_bytes(directory: Path) -> int:
    """Free space of the filesystem holding ``directory``, for an unprivileged writer."""
    st = os.statvfs(directory)
    return int(st.f_bavail * st.f_frsize)


def auto_max_bytes(directory: Path, used: int = 0) -> int:
    """A quarter of the free space of the spool's filesystem (plus what it already uses), at
    most :data:`AUTO_MAX_BYTES`."""
    return int(min(AUTO_MAX_BYTES, used + free_bytes(directory) * AUTO_SHARE))


class Spool:
    """A node's spool file. Open it with :meth:`open` (which checks it) in the process that
    uses it; the connection is rebuilt after a fork."""

    def __init__(self, directory: str | Path, node: str, max_bytes: int = 0) -> None:
        self.directory = Path(directory)
        self.path = self.directory / node_file(node)
        self._max_bytes = max_bytes  # 0: automatic, computed at open
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        # _counts()'s cache: ((pid, data_version), depth, oldest); _wrote: a write since
        self._counted: tuple[tuple[int, int], int, float | None] | None = None
        self._wrote = False

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r})"

    # --- opening, checking, setting aside ------------------------------------------------------
    def open(self) -> list[Path]:
        """Open (creating if need be) and check the spool; a damaged file is renamed, never
        deleted, and a new one started. Returns what was set aside now. Anything else than
        damage (a full disk, an I/O error, a lock held too long) raises :class:`SpoolError`:
        a healthy spool must not be set aside for it."""
        set_aside: list[Path] = []
        try:
            self._connect()
            problem = self._check()
        except sqlite3.DatabaseError as exc:
            if not damage(exc):
                self.close()
                raise SpoolError(
                    f"spool {self.path} cannot be opened: {type(exc).__name__}: {exc}"
                ) from exc
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            self.close()
            set_aside = self._set_aside(problem)
            self._connect()
        if not self._max_bytes:
            self._max_bytes = auto_max_bytes(self.directory, self._used_bytes())
        return set_aside

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # A connection made before a fork belongs to the parent: never used here.
        self._conn = None
        old = os.umask(0o077)
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        finally:
            os.umask(old)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Before the WAL mode, which writes the new file's header: auto_vacuum can be set on
        # a file without tables only (after, only a VACUUM changes it: compact()). A spool
        # whose deleted rows' pages go back to the filesystem (incremental_vacuum).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk (WAL fsync-ed) before the message is acknowledged.
        conn.execute("PRAGMA synchronous = FULL")
        # After a checkpoint, the WAL file is cut back to this size (bytes).
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif conn.execute("PRAGMA user_version").fetchone()[0] == 1:
            # A spool of the previous version: one column more, its rows kept.
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("PRAGMA user_version").fetchone()[0] == 1:
                conn.execute(_MIGRATE_1)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _check(self) -> str | None:
        conn = self._connect()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            return f"unknown spool format {version}"
        result = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if result != ["ok"]:
            return "; ".join(str(r) for r in result[:3])
        conn.execute("SELECT count(*) FROM spool").fetchone()
        return None

    def _set_aside(self, problem: str) -> list[Path]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved: list[Path] = []
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                target = Path(f"{self.path}.damaged-{stamp}{suffix}")
                source.rename(target)
                moved.append(target)
        log.error(
            "spool %s is damaged (%s): set aside as %s, kept for inspection; a new spool is "
            "started. Its statements are not delivered until it is repaired (see the "
            "operator guide, 'The spool')",
            self.path,
            problem[:200],
            f"{self.path}.damaged-{stamp}",
        )
        return moved

    def damaged_files(self) -> list[Path]:
        return sorted(
            p
            for p in self.directory.glob(f"{self.path.name}.damaged-*")
            if not p.name.endswith(("-wal", "-shm"))
        )

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None

    # --- size ------------------------------------------------------------------------------------
    @property
    def max_bytes(self) -> int:
        return self._max_bytes or AUTO_MAX_BYTES

    def _used_bytes(self) -> int:
        conn = self._connect()
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        # The pages the statements take, as this connection sees the database (the WAL's
        # newer pages included); the WAL file itself is bounded by journal_size_limit.
        return int((pages - free) * page)

    # --- writes ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        self._wrote = True
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def add(self, entries: Sequence[Entry], now: float | None = None) -> None:
        """Spool ``entries`` in one transaction, committed to disk on return; raise
        :class:`SpoolError` (nothing written) when they cannot be."""
        if not entries:
            return
        now = time.time() if now is None else now
        rows = [
            (
                printable(str(e.statement.get("id", ""))),
                json_text(e.statement),
                e.task_id,
                e.attempts,
                e.first_seen,
                now,
                e.next_at,
                printable(e.last_error[:500]),
                e.lone_failures,
            )
            for e in entries
        ]
        incoming = sum(len(r[1]) + len(r[2]) + 200 for r in rows)
        try:
            # The hard limit; the drainer stops the node taking before it (Stats.full).
            used, free = self._used_bytes(), free_bytes(self.directory)
            if incoming <= room(used, self.max_bytes, free):
                pass
            elif used + incoming > self.max_bytes:
                raise SpoolFull(
                    f"spool {self.path} is full ({self.max_bytes // 1024**2} MiB): "
                    f"{len(rows)} statements stay in the broker"
                )
            else:
                raise SpoolFull(
                    f"spool {self.path}: its disk is full (less than "
                    f"{DISK_RESERVE_BYTES // 1024**2} MiB free): {len(rows)} statements stay "
                    "in the broker"
                )
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT INTO spool (statement_id, statement, task_id, attempts, first_seen,"
                    " spooled_at, next_at, last_error, lone_failures) VALUES (?,?,?,?,?,?,?,?,?)",
                    rows,
                )
        except SpoolError:
            raise
        except (sqlite3.Error, OverflowError, ValueError) as exc:
            # disk full, I/O error, locked for too long; a value SQLite cannot hold
            raise SpoolError(f"spool {self.path}: {type(exc).__name__}: {exc}") from exc

    def delete(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._transaction() as conn:
            conn.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])

    def erase(self, ids: Sequence[int]) -> int:
        """Delete these rows for good (a learner's erasure, forget.py): their content is
        overwritten in the file (``secure_delete``) and the WAL's older copies of their pages
        are checkpointed away when no reader holds them. Returns how many were deleted."""
        if not ids:
            return 0
        conn = self._connect()
        conn.execute("PRAGMA secure_delete = ON")
        with self._transaction() as conn:
            deleted = sum(
                conn.execute("DELETE FROM spool WHERE id = ?", (i,)).rowcount for i in ids
            )
        # Best effort: a reader of another process may hold older frames for a while.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def reschedule(
        self,
        ids: Sequence[int],
        next_at: float,
        error: str,
        attempt_step: int = 1,
        lone_failures: Mapping[int, int] | None = None,
    ) -> None:
        """Another attempt failed (or was held): try these again at ``next_at``, with each
        row's count of lone failures (``lone_failures``, by row id) where given."""
        if not ids:
            return
        lone = lone_failures or {}
        error = printable(error[:500])
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE spool SET attempts = attempts + ?, next_at = ?, last_error = ?, "
                "lone_failures = coalesce(?, lone_failures) WHERE id = ?",
                [(attempt_step, next_at, error, lone.get(i), i) for i in ids],
            )

    def wake(self, now: float | None = None, beyond: float = 0.0) -> int:
        """Everything spooled is due now (oldest first): the LRS answers again. With
        ``beyond``: only the rows due later than that many seconds from now."""
        now = time.time() if now is None else now
        with self._transaction() as conn:
            return conn.execute(
                "UPDATE spool SET next_at = ? WHERE next_at > ?", (now, now + beyond)
            ).rowcount

    def compact(self) -> None:
        """Give the pages of deleted rows back to the filesystem, and empty the WAL file."""
        conn = self._connect()
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == AUTO_VACUUM_INCREMENTAL:
            # Each step of this statement frees one page, and the sqlite3 module's execute()
            # steps it once: executescript() runs it to its end.
            conn.executescript("PRAGMA incremental_vacuum;")
        elif conn.execute("SELECT 1 FROM spool LIMIT 1").fetchone() is None:
            # A spool made while auto_vacuum stayed off (set after the WAL mode): rebuilt
            # with it on, once, while it is empty (a VACUUM of an empty file is quick).
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def reclaimable(self) -> int:
        """Bytes compact() would give back: the free pages, and the WAL file."""
        conn = self._connect()
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        try:
            wal = Path(f"{self.path}-wal").stat().st_size
        except OSError:
            wal = 0
        return int(page * free) + wal

    # --- reads -----------------------------------------------------------------------------------
    def due(self, limit: int, now: float | None = None, exclude: Sequence[int] = ()) -> list[Row]:
        """The oldest statements whose next attempt is due, at most ``limit``, but for the
        rows ``exclude`` lists (a batch still at the LRS)."""
        now = time.time() if now is None else now
        if not exclude:
            return self._rows("WHERE next_at <= ? ORDER BY id LIMIT ?", (now, limit))
        # One bound parameter, a JSON array, whatever the batch size (SQLite bounds the
        # number of parameters of a statement).
        return self._rows(
            "WHERE next_at <= ? AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
            (now, json.dumps(list(exclude)), limit),
        )

    def rows(self, limit: int = -1, after: int = 0) -> list[Row]:
        return self._rows("WHERE id > ? ORDER BY id LIMIT ?", (after, limit))

    def _rows(self, where: str, params: tuple[Any, ...]) -> list[Row]:
        # ``where`` is one of this module's constants; every value is a bound parameter.
        query = f"SELECT {_COLUMNS} FROM spool {where}"  # noqa: S608
        cursor = self._connect().execute(query, params)
        return [
            Row(
                id=r[0],
                statement=json.loads(r[1]),
                task_id=r[2],
                attempts=r[3],
                first_seen=r[4],
                spooled_at=r[5],
                next_at=r[6],
                last_error=r[7],
                lone_failures=r[8],
            )
            for r in cursor
        ]

    def _counts(self) -> tuple[int, float | None]:
        """Depth and oldest first_seen: two scans of the table, done again only once the
        spool has changed (a write of this object's, or a commit of another connection's:
        SQLite's data_version). An idle spool is not scanned every time it is published."""
        conn = self._connect()
        version = (os.getpid(), conn.execute("PRAGMA data_version").fetchone()[0])
        if self._counted is not None and not self._wrote and self._counted[0] == version:
            return self._counted[1], self._counted[2]
        self._wrote = False
        row = conn.execute("SELECT count(*), min(first_seen) FROM spool").fetchone()
        self._counted = (version, int(row[0]), None if row[1] is None else float(row[1]))
        return self._counted[1], self._counted[2]

    def stats(self, counts: bool = True) -> Stats:
        """Depth, oldest, size, room. ``counts=False``: size and room only (``depth`` -1,
        ``oldest`` None, ``damaged`` 0), without the two scans of the table that depth and
        oldest cost (about 5 ms at 20,000 statements), for the drainer's check between two
        batches."""
        depth, oldest, damaged = -1, None, 0
        if counts:
            depth, oldest = self._counts()
            damaged = len(self.damaged_files())
        return Stats(
            depth=depth,
            oldest=None if oldest is None else float(oldest),
            used_bytes=self._used_bytes(),
            max_bytes=self.max_bytes,
            damaged=damaged,
            free_bytes=free_bytes(self.directory),
        )
