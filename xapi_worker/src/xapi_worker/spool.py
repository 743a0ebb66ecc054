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

import calendar
import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.request import pathname2url

from .content import MAX_STATEMENT_BYTES, json_text, printable
from .watchdog import kept_alive

log = logging.getLogger("xapi_worker.spool")

#: The documented maximum of an automatic size limit, and its share of the free disk.
AUTO_MAX_BYTES = 10 * 1024**3
AUTO_SHARE = 0.25
#: What one spooled row may take beyond its statement's JSON text (UTF-8): its other
#: columns (ids, the last error, cut at 500 characters), SQLite's record and cell headers,
#: its two index entries, and the unused end of its last overflow page (a page).
ROW_OVERHEAD_BYTES = 8 * 1024
#: Most characters of the ``statement_id`` column (a statement's id, for a person reading the
#: file; no code reads it: the id travels in the statement). A UUID takes 36; a browser can
#: send an id of any length, which, kept whole there too, would count twice in the row.
ID_COLUMN_CHARS = 64
#: A full spool takes again below this share of its limit, and with this much room above
#: where it stopped on its disk: far enough that it does not stop again at once.
RESUME_SHARE = 0.9
RESUME_DISK_BYTES = 8 * 1024**2
#: Free space the spool leaves on its filesystem: below it the spool counts as full, whatever
#: its own size, so a disk filled by something else (an encoding's ffmpeg) stops the node
#: taking instead of failing every write. SQLite needs room for the WAL and a checkpoint.
DISK_RESERVE_BYTES = 16 * 1024**2
#: A damaged spool is renamed ``<file>.damaged-<time, UTC>``; once ``spool drain`` has
#: delivered its readable rows, ``<that name>.salvaged``.
SET_ASIDE = ".damaged-"
SET_ASIDE_STAMP = "%Y%m%dT%H%M%SZ"
SALVAGED = ".salvaged"
#: ``<file>.check``: SQLite said the file was damaged while in use; the next open reads it
#: whole (quick_check), sets it aside if it is, and else rebuilds its indexes (REINDEX: a
#: damaged index, which quick_check does not compare with its table, is made again from it).
CHECK_MARK = ".check"
#: ``<file>.checked``: the open after a damage found the file sound and rebuilt its indexes.
#: A damage met again after that is not checked a second time: the file is set aside (for
#: ``spool drain``), so that no damage makes the node start and stop for ever.
CHECKED_MARK = ".checked"
#: ``<file>.lock``: held (``flock``, exclusive) by the process that opened the spool, for as
#: long as it runs (the worker's main process, inherited by its pool processes; ``spool
#: drain`` while the node is stopped): only its holder checks the file or sets it aside, never
#: a second opener (``spool drain`` while the node runs: it then salvages set-aside files
#: into the spool and delivers its rows beside the node), which would set aside a file a live
#: worker still writes. The kernel drops the lock with the last process holding it: a killed
#: worker leaves no stale lock.
LOCK = ".lock"
#: ``<file>.setting-aside``: the set-aside in progress (its target's name, written and
#: fsync-ed before the first rename, removed after the last): an open finds it after a kill
#: between the renames and finishes the job, so a ``-wal`` is never left behind its file.
SETTING_ASIDE = ".setting-aside"
#: Waiting for the other writer (pool process or drainer) before giving up, milliseconds.
BUSY_TIMEOUT_MS = 10_000
#: The spool's file format (``PRAGMA user_version``). 2 added ``lone_failures``; 3 the
#: depth kept by triggers and the index of ``first_seen`` (no scan of the table to count
#: it); 4 the node's dead letters (deadstore.py). Older formats are migrated at open; a
#: newer one is refused (:class:`SpoolNewer`).
SCHEMA_VERSION = 4
AUTO_VACUUM_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
#: The drainer, idle, compacts the spool once it could give back more than this.
SHRINK_ABOVE_BYTES = 512 * 1024
WAL_LIMIT_BYTES = 4 * 1024**2

_TABLE = """
CREATE TABLE spool (
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
CREATE INDEX spool_due ON spool (next_at, id);
"""

#: Format 3: the depth in a one-row table that triggers keep (any writer, any DELETE),
#: and the oldest first_seen read from an index: both without a scan of the table.
_COUNTED = """
CREATE INDEX spool_first_seen ON spool (first_seen);
CREATE TABLE spool_depth (depth INTEGER NOT NULL);
INSERT INTO spool_depth SELECT count(*) FROM spool;
CREATE TRIGGER spool_added AFTER INSERT ON spool
    BEGIN UPDATE spool_depth SET depth = depth + 1; END;
CREATE TRIGGER spool_removed AFTER DELETE ON spool
    BEGIN UPDATE spool_depth SET depth = depth - 1; END;
"""

#: Format 4: the node's dead letters (deadstore.py), in the same file, so that they have
#: its protections (0600, fsync-ed commits, the checks and set-aside of a damaged file) and
#: take the disk's room instead of the broker's memory. ``entry`` is the dead letter's JSON
#: (UTF-8 bytes); ``bytes`` what it counts against XAPI_WORKER_DEAD_LETTER_MAX_MB (kept
#: summed with the count by triggers: no scan); ``origin`` the SHA-256 of the element of
#: the broker's list it was moved from (NULL: written here), unique, so a move that is done
#: again after a crash adds nothing twice.
_DEAD = """
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    entry BLOB NOT NULL,
    written_at REAL NOT NULL,
    bytes INTEGER NOT NULL,
    origin TEXT UNIQUE
);
CREATE INDEX dead_letters_written ON dead_letters (written_at);
CREATE TABLE dead_letter_size (count INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO dead_letter_size VALUES (0, 0);
CREATE TRIGGER dead_letter_added AFTER INSERT ON dead_letters
    BEGIN UPDATE dead_letter_size SET count = count + 1, bytes = bytes + NEW.bytes; END;
CREATE TRIGGER dead_letter_removed AFTER DELETE ON dead_letters
    BEGIN UPDATE dead_letter_size SET count = count - 1, bytes = bytes - OLD.bytes; END;
"""

#: A new file (format 0) is given this, of format SCHEMA_VERSION.
_NEW = _TABLE + _COUNTED + _DEAD
#: What brings a file of the format of the key to the next one, in place (its rows kept).
#: From 2 to 3 the rows are counted once (a scan, once in a file's life).
_MIGRATIONS: dict[int, str] = {
    1: "ALTER TABLE spool ADD COLUMN lone_failures INTEGER NOT NULL DEFAULT 0;",
    2: _COUNTED,
    3: _DEAD,
}

_COLUMNS = (
    "id, statement, task_id, attempts, first_seen, spooled_at, next_at, last_error, lone_failures"
)


#: The salvages' progress (salvage.py): by set-aside file, the last of its row ids now in this
#: spool. Made by the first salvage; a release without it leaves the table alone.
_SALVAGED_TABLE = (
    "CREATE TABLE IF NOT EXISTS salvaged (source TEXT PRIMARY KEY, last_id INTEGER NOT NULL)"
)


class SpoolError(Exception):
    """The spool cannot take these statements now (full, disk full, I/O error): the caller
    keeps them where they are (the messages go back to the broker)."""


class SpoolFull(SpoolError):
    pass


class SpoolHeld(SpoolError):
    """Another process (a running node of this spool, a ``spool drain``) holds the spool."""


class SpoolNewer(SpoolError):
    """The file is of a newer format than this worker's (a release installed, then an
    older one again): no damage, and not for this worker to read or change. Kept as it is;
    the node takes nothing until a release that knows the format runs."""


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
    """A spool's size and room, and the one rule of a full spool (with :func:`room`, which
    :meth:`Spool.add` obeys)."""

    depth: int
    oldest: float | None  # first_seen of the oldest spooled statement
    used_bytes: int
    max_bytes: int
    damaged: int
    free_bytes: int  # free space of the spool's filesystem
    damaged_files: tuple[str, ...] = ()  # set aside, not drained yet (names, oldest first)
    damaged_since: float | None = None  # when the oldest of them was set aside
    headroom: int = 0  # the most one batch can write: batch_bytes() of the node's batch size

    @property
    def room(self) -> int:
        return room(self.used_bytes, self.max_bytes, self.free_bytes)

    @property
    def disk_full(self) -> bool:
        """The disk, not the spool's limit, is what is short of room."""
        return self.free_bytes - DISK_RESERVE_BYTES < self.headroom

    @property
    def full(self) -> bool:
        """The node stops taking: less room than the most one batch can write, which add()
        would still take, so a node that takes never meets add()'s refusal with a batch."""
        return self.room < self.headroom

    @property
    def roomy(self) -> bool:
        """A full spool takes again (hysteresis: well away from where it stopped)."""
        return (
            self.used_bytes < self.max_bytes * RESUME_SHARE
            and self.free_bytes - DISK_RESERVE_BYTES >= self.headroom + RESUME_DISK_BYTES
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


def row_bytes(statement_text: str, *others: str) -> int:
    """What a row takes in the spool, at most: its texts' UTF-8 bytes (not characters: a
    statement in Greek or with emoji takes up to 4 bytes a character), and the overhead."""
    return (
        len(statement_text.encode("utf-8"))
        + sum(len(o.encode("utf-8")) for o in others)
        + ROW_OVERHEAD_BYTES
    )


def batch_bytes(batch_size: int, statement_bytes: int = MAX_STATEMENT_BYTES) -> int:
    """The most one batch can write to the spool: ``batch_size`` statements of the largest
    size the worker takes (``statement_bytes``, XAPI_WORKER_MAX_STATEMENT_KB; a larger one
    is dead-lettered without reaching the spool), each with its row's overhead. A spool with
    less room than this counts as full (Stats.full)."""
    return batch_size * (statement_bytes + ROW_OVERHEAD_BYTES)


def min_max_bytes(batch_size: int, statement_bytes: int = MAX_STATEMENT_BYTES) -> int:
    """The smallest size limit a spool may be given: room for four batches of the largest
    statements (a smaller one would count as full before it held a few)."""
    return 4 * batch_bytes(batch_size, statement_bytes)


def room(used_bytes: int, max_bytes: int, free: int) -> int:
    """Bytes the spool may still write: up to its limit, never into the disk's reserve
    (:data:`DISK_RESERVE_BYTES`). add() refuses more; Stats.full stops the node taking
    before."""
    return min(max_bytes - used_bytes, free - DISK_RESERVE_BYTES)


def set_aside_at(path: Path) -> float | None:
    """When a file was set aside (epoch seconds), from the time in its name."""
    stamp = path.name.rpartition(SET_ASIDE)[2][: len("YYYYmmddTHHMMSSZ")]
    try:
        return calendar.timegm(time.strptime(stamp, SET_ASIDE_STAMP))
    except ValueError:
        return None


def _statements(script: str) -> list[str]:
    """The statements of a schema script, one by one (a trigger's body holds semicolons:
    SQLite says where a statement ends)."""
    out: list[str] = []
    current = ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


def node_file(node: str) -> str:
    """The file name of a node's spool: the node name (``xapi@host``) with anything but
    letters, digits, ``@``, ``.``, ``_`` and ``-`` replaced, so it stays one plain name."""
    return re.sub(r"[^A-Za-z0-9@._-]", "_", node) + ".sqlite3"


def connect(
    target: str | Path,
    uri: bool = False,
    timeout: float = BUSY_TIMEOUT_MS / 1000,
    isolation_level: Literal["DEFERRED", "EXCLUSIVE", "IMMEDIATE"] | None = "DEFERRED",
) -> sqlite3.Connection:
    """An SQLite connection (``sqlite3.connect``'s arguments) that trusts nothing the file's
    schema holds: ``trusted_schema`` off (a trigger, view or default of the file may use no
    function or virtual table that SQLite does not mark harmless, such as the ``pragma_*``
    tables), and SQLite's defensive mode where Python can set it (``Connection.setconfig``,
    Python 3.12 and later; Python 3.11's sqlite3 has no way to). A spool file may have been
    written by another user (Pod's, before the spool became the worker's user's)."""
    conn = sqlite3.connect(target, timeout=timeout, isolation_level=isolation_level, uri=uri)
    try:
        conn.execute("PRAGMA trusted_schema = OFF")
        if sys.version_info >= (3, 12):
            conn.setconfig(sqlite3.SQLITE_DBCONFIG_DEFENSIVE, True)
    except BaseException:
        conn.close()
        raise
    return conn


def free_bytes(directory: Path) -> int:
    """Free space of the filesystem holding ``directory``, for an unprivileged writer."""
    st = os.statvfs(directory)
    return int(st.f_bavail * st.f_frsize)


def auto_max_bytes(directory: Path, used: int = 0) -> int:
    """A quarter of the free space of the spool's filesystem (plus what it already uses), at
    most :data:`AUTO_MAX_BYTES`."""
    return int(min(AUTO_MAX_BYTES, used + free_bytes(directory) * AUTO_SHARE))


def _sync_directory(directory: Path) -> None:
    """fsync a directory: the renames in it are on disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A node's spool file. Open it with :meth:`open` (which checks it) in the process that
    uses it; the connection is rebuilt after a fork."""

    def __init__(
        self,
        directory: str | Path,
        node: str,
        max_bytes: int = 0,
        batch_size: int = 100,
        statement_bytes: int = MAX_STATEMENT_BYTES,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / node_file(node)
        self._max_bytes = max_bytes  # 0: automatic, computed at open
        self.batch_size = batch_size  # the node's XAPI_WORKER_BATCH_SIZE: the headroom's unit
        self.statement_bytes = statement_bytes  # XAPI_WORKER_MAX_STATEMENT_KB, in bytes
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock_fd: int | None = None  # LOCK, held from open() to release()

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r})"

    # --- opening, checking, setting aside ------------------------------------------------------
    def open(self, exclusive: bool = False) -> list[Path]:
        """Open (creating if need be) and check the spool; a damaged file is renamed, never
        deleted, and a new one started. Returns what was set aside now. Only the holder of
        the spool's lock (:data:`LOCK`, taken here) checks or sets aside: when another
        process holds it (its node runs), the file is opened as it is, unchecked, or, with
        ``exclusive`` (the node itself), :class:`SpoolHeld` is raised. Anything else than
        damage (a full disk, an I/O error, a lock held too long) raises :class:`SpoolError`:
        a healthy spool must not be set aside for it. The watchdog is fed meanwhile
        (watchdog.kept_alive): a migration or a whole check takes minutes on a large spool,
        before Celery's loop feeds it."""
        try:
            self.hold()
        except SpoolHeld:
            if exclusive:
                raise
            # Its node runs: the file is its node's to check and set aside, never ours (a
            # row it commits after would go to a file nothing drains). Rows are read and
            # written through SQLite's own locking, as the node's processes do.
            log.info("spool %s: its node holds it: opened without a check", self.path)
            self._connect()
            return []
        with kept_alive(f"spool {self.path}: opening and checking"):
            return self._open()

    @property
    def _lock_path(self) -> Path:
        return Path(f"{self.path}{LOCK}")

    def hold(self) -> None:
        """Take the spool's lock (:data:`LOCK`) for this object until :meth:`close` (or
        the end of the process and of its children); :class:`SpoolHeld` when another
        process holds it. Opening the spool takes it: a node's spool is opened, checked and
        set aside only by the process that holds it."""
        if self._lock_fd is not None:
            return
        old = os.umask(0o077)
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool {self.path} cannot be locked: {exc}") from exc
        finally:
            os.umask(old)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SpoolHeld(
                f"spool {self.path} is held by another process (its node running, or a "
                "`spool drain`); it starts again once that one has stopped"
            ) from exc
        self._lock_fd = fd

    def _open(self) -> list[Path]:
        set_aside: list[Path] = self._finish_set_aside()
        whole = self.check_pending()
        try:
            self._connect()
            problem = self._check(whole)
        except sqlite3.DatabaseError as exc:
            if not damage(exc):
                self.close()
                raise SpoolError(
                    f"spool {self.path} cannot be opened: {type(exc).__name__}: {exc}"
                ) from exc
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            self.close(keep_lock=True)  # the connection only: the set-aside is ours
            set_aside += self._set_aside(problem)
            self._connect()
        if whole:
            if problem is None:
                # Sound now: a damage met again is not checked again (CHECKED_MARK).
                with contextlib.suppress(FileNotFoundError):
                    self._check_mark.replace(self._checked_mark)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self._check_mark.unlink()
        if not self._max_bytes:
            self._max_bytes = auto_max_bytes(self.directory, self._used_bytes())
        return set_aside

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # A connection made before a fork belongs to the parent: never used here.
        self._conn = None
        self._refuse_newer()
        old = os.umask(0o077)
        try:
            conn = connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        finally:
            os.umask(old)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Before the WAL mode, which writes the new file's header: auto_vacuum can be set
            # on a file without tables only (after, only a VACUUM changes it: compact()). A
            # spool whose deleted rows' pages go back to the filesystem (incremental_vacuum).
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk (WAL fsync-ed) before the message is acknowledged.
            conn.execute("PRAGMA synchronous = FULL")
            # After a checkpoint, the WAL file is cut back to this size (bytes).
            conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
            self._migrate(conn)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            raise
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _format(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SpoolNewer(
                f"spool {self.path} is of format {version}, newer than this worker's "
                f"({SCHEMA_VERSION}): it was written by a newer release of xapi-worker. It is "
                "kept as it is, and this node takes nothing until a release that reads it "
                "runs again (or the file is moved away)"
            )
        return version

    def _refuse_newer(self) -> None:
        """Before anything is written to an existing file: one of a newer format is refused
        (:class:`SpoolNewer`), read through a read-only connection so that it is left as it
        is. Any other error here is left for the read-write open to judge (damage or not)."""
        try:
            if self.path.stat().st_size == 0:
                return
        except OSError:
            return
        try:
            peek = connect(
                f"file:{pathname2url(str(self.path))}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error:
            return
        try:
            self._format(peek)
        except sqlite3.Error:
            return
        finally:
            peek.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """A new file gets the schema; a file of an older format is brought to this one in
        place, its rows kept, in one transaction (another process may be doing the same:
        the version is read again once the lock is held)."""
        if self._format(conn) == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        began, migrated = 0.0, 0
        try:
            version = self._format(conn)
            if version == 0:
                for statement in _statements(_NEW):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version in _MIGRATIONS:
                log.warning(
                    "spool %s: bringing format %d to %d (the rows are counted once)",
                    self.path,
                    version,
                    SCHEMA_VERSION,
                )
                began, migrated = time.monotonic(), version
                while version < SCHEMA_VERSION:
                    for statement in _statements(_MIGRATIONS[version]):
                        conn.execute(statement)
                    version += 1
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if migrated:
            log.warning(
                "spool %s: format %d brought to %d in %.1f s",
                self.path,
                migrated,
                SCHEMA_VERSION,
                time.monotonic() - began,
            )

    def _check(self, whole: bool = False) -> str | None:
        """What opening costs, whatever the spool's size: the header, the schema and the
        format, no scan of the table (SQLite's quick_check reads every page: minutes at the
        size limit, before the worker could serve). A damaged page is met when it is read,
        and marks the file (:meth:`check_pending`): ``whole``, the open after, reads every
        page (quick_check) and sets a damaged file aside."""
        conn = self._connect()
        version = self._format(conn)
        if version != SCHEMA_VERSION:
            return f"unknown spool format {version}"
        conn.execute("SELECT depth FROM spool_depth").fetchone()
        conn.execute(f"SELECT {_COLUMNS} FROM spool WHERE id = 0").fetchone()  # noqa: S608
        conn.execute("SELECT count, bytes FROM dead_letter_size").fetchone()
        conn.execute("SELECT entry, written_at, origin FROM dead_letters WHERE id = 0").fetchone()
        if whole:
            if self._checked_mark.exists():
                return (
                    "SQLite met a damage again after the file was checked and its indexes rebuilt"
                )
            result = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if result != ["ok"]:
                return "; ".join(str(r) for r in result[:3])
            # quick_check does not compare an index with its table: an index pointing at
            # rows no longer there passes it, and every read through it fails. The indexes
            # are rebuilt from the table (a read of it, as quick_check's), and the depth
            # counted again, in one transaction.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("REINDEX")
                conn.execute("UPDATE spool_depth SET depth = (SELECT count(*) FROM spool)")
                conn.execute(
                    "UPDATE dead_letter_size SET count = (SELECT count(*) FROM dead_letters),"
                    " bytes = (SELECT coalesce(sum(bytes), 0) FROM dead_letters)"
                )
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            log.warning("spool %s: checked whole after a damage: sound; indexes rebuilt", self.path)
        return None

    # --- damage met while running ----------------------------------------------------------------
    @property
    def _check_mark(self) -> Path:
        return Path(f"{self.path}{CHECK_MARK}")

    @property
    def _checked_mark(self) -> Path:
        return Path(f"{self.path}{CHECKED_MARK}")

    def check_pending(self) -> bool:
        """SQLite said the file is damaged while it was in use: the node stops (the drainer),
        and the next open reads it whole and sets it aside if it is."""
        return self._check_mark.exists()

    @contextlib.contextmanager
    def _watch(self) -> Iterator[None]:
        """Around a use of the file: an error saying it is damaged marks it for the whole
        check of the next open."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if damage(exc) and not self.check_pending():
                old = os.umask(0o077)
                try:
                    self._check_mark.touch()
                except OSError:
                    log.exception("cannot mark spool %s for a check", self.path)
                finally:
                    os.umask(old)
                log.critical(
                    "spool %s: SQLite says the file is damaged (%s: %s): the node stops; its "
                    "next start reads it whole and sets it aside if it is",
                    self.path,
                    type(exc).__name__,
                    exc,
                )
            raise

    def _set_aside(self, problem: str) -> list[Path]:
        """Rename the file, its ``-wal`` and ``-shm`` to ``<file>.damaged-<time>`` (a time
        no earlier set-aside file of this node has: never over another), journaled
        (:data:`SETTING_ASIDE`): a kill between the renames is finished by the next open."""
        target = self._free_set_aside_name()
        journal = Path(f"{self.path}{SETTING_ASIDE}")
        old = os.umask(0o077)
        try:
            with journal.open("w") as out:
                out.write(target.name)
                out.flush()
                os.fsync(out.fileno())
        finally:
            os.umask(old)
        _sync_directory(self.directory)
        moved = self._finish_set_aside()
        log.error(
            "spool %s is damaged (%s): set aside as %s, kept; a new spool is started. Its "
            "readable statements are delivered by `xapi-worker spool drain` (see the "
            "operator guide, 'The spool')",
            self.path,
            problem[:200],
            target,
        )
        return moved

    def _free_set_aside_name(self) -> Path:
        """``<file>.damaged-<now>``, or a second later, until no file (nor its ``-wal``,
        ``-shm`` or ``.salvaged`` forms) has the name: two set-asides within one second
        (a restarting node, then another open) keep both files."""
        now = int(time.time())
        for step in range(3600):
            stamp = time.strftime(SET_ASIDE_STAMP, time.gmtime(now + step))
            target = Path(f"{self.path}{SET_ASIDE}{stamp}")
            taken = (f"{target}{end}" for end in ("", "-wal", "-shm", SALVAGED))
            if not any(os.path.lexists(name) for name in taken):
                return target
        raise SpoolError(f"spool {self.path}: no free name to set it aside")

    def _finish_set_aside(self) -> list[Path]:
        """Do (or finish, after a kill) the set-aside its journal names: ``-wal`` and
        ``-shm`` first, the file last, each linked to its new name (never over an existing
        one) then unlinked; the journal removed once all three are moved."""
        journal = Path(f"{self.path}{SETTING_ASIDE}")
        try:
            name = journal.read_text().strip()
        except FileNotFoundError:
            return []
        target = self.directory / name
        if not name.startswith(f"{self.path.name}{SET_ASIDE}") or "/" in name:
            raise SpoolError(f"spool {self.path}: {journal} names no set-aside file: {name!r}")
        moved: list[Path] = []
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{self.path}{suffix}")
            dest = Path(f"{target}{suffix}")
            if not os.path.lexists(source):
                continue
            if os.path.lexists(dest):
                if os.path.samefile(source, dest):  # linked before a kill: unlink now
                    source.unlink()
                    moved.append(dest)
                    continue
                raise SpoolError(f"spool {self.path}: {dest} exists already, not overwritten")
            os.link(source, dest)
            source.unlink()
            moved.append(dest)
        _sync_directory(self.directory)
        with contextlib.suppress(FileNotFoundError):
            self._checked_mark.unlink()  # the new file was never checked
        journal.unlink()
        _sync_directory(self.directory)
        return moved

    def damaged_files(self) -> list[Path]:
        """This node's set-aside files not drained yet (``<file>.damaged-<time>``), oldest
        first; their ``-wal`` and ``-shm`` files beside them are left out."""
        return sorted(
            p
            for p in self.directory.glob(f"{self.path.name}{SET_ASIDE}*")
            if not p.name.endswith(("-wal", "-shm", SALVAGED))
        )

    def close(self, keep_lock: bool = False) -> None:
        """Close the connection, and give the lock up unless ``keep_lock`` (the worker's
        main process keeps it for the node's life: its pool processes reopen the file)."""
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None
        if self._lock_fd is not None and not keep_lock:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

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
    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, fsync-ed), for the other tables of
        the file (deadstore.py); a damage met marks the file for the next open's check."""
        return self._transaction()

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads, a damage met marking the file (as :meth:`_rows`)."""
        conn = self._connect()
        with self._watch():
            yield conn

    def used_bytes(self) -> int:
        """What the file's pages hold (its statements and its dead letters)."""
        return self._used_bytes()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        with self._watch():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def add(
        self,
        entries: Sequence[Entry],
        now: float | None = None,
        source: str = "the broker",
        progress: tuple[str, int] | None = None,
    ) -> None:
        """Spool ``entries`` in one transaction, committed to disk on return; raise
        :class:`SpoolError` (nothing written) when they cannot be, saying that they stay in
        ``source`` (where they come from). ``progress`` (a set-aside file's name, the last
        of its row ids these entries come from) is recorded in the same transaction
        (:meth:`salvaged_up_to`): a salvage killed and run again takes no row twice."""
        if not entries:
            return
        now = time.time() if now is None else now
        rows = [
            (
                printable(str(e.statement.get("id", ""))[:ID_COLUMN_CHARS]),
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
        incoming = sum(row_bytes(r[1], r[0], r[2], r[7]) for r in rows)
        try:
            # The hard limit; the drainer stops the node taking before it (Stats.full).
            used, free = self._used_bytes(), free_bytes(self.directory)
            if incoming <= room(used, self.max_bytes, free):
                pass
            elif used + incoming > self.max_bytes:
                raise SpoolFull(
                    f"spool {self.path} is full ({self.max_bytes // 1024**2} MiB): "
                    f"{len(rows)} statements stay in {source}"
                )
            else:
                raise SpoolFull(
                    f"spool {self.path}: its disk is full (less than "
                    f"{DISK_RESERVE_BYTES // 1024**2} MiB free): {len(rows)} statements stay "
                    f"in {source}"
                )
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT INTO spool (statement_id, statement, task_id, attempts, first_seen,"
                    " spooled_at, next_at, last_error, lone_failures) VALUES (?,?,?,?,?,?,?,?,?)",
                    rows,
                )
                if progress is not None:
                    conn.execute(_SALVAGED_TABLE)
                    conn.execute(
                        "INSERT INTO salvaged (source, last_id) VALUES (?, ?) ON CONFLICT "
                        "(source) DO UPDATE SET last_id = excluded.last_id",
                        progress,
                    )
        except SpoolError:
            raise
        except (sqlite3.Error, OverflowError, ValueError) as exc:
            # disk full, I/O error, locked for too long; a value SQLite cannot hold
            raise SpoolError(f"spool {self.path}: {type(exc).__name__}: {exc}") from exc

    def salvaged_up_to(self, source: str) -> int:
        """The last row id of the set-aside file ``source`` (its name) whose rows are in this
        spool already (0: none)."""
        conn = self._connect()
        with self._watch():
            try:
                row = conn.execute(
                    "SELECT last_id FROM salvaged WHERE source = ?", (source,)
                ).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise
                return 0
        return int(row[0]) if row else 0

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
        elif (
            conn.execute("SELECT depth FROM spool_depth").fetchone()[0] == 0
            and conn.execute("SELECT count FROM dead_letter_size").fetchone()[0] == 0
        ):
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
        """The statements whose next attempt is due, at most ``limit``, but for the rows
        ``exclude`` lists (a batch still at the LRS): those due first, oldest first among
        equals (after a wake every row is due at the same time: oldest first). In the order
        of the index spool_due, so a read costs a few pages whatever the spool's size (in
        the order of the rows, SQLite scanned the table for the due ones: every second on
        an idle spool whose rows were due later)."""
        now = time.time() if now is None else now
        if not exclude:
            return self._rows("WHERE next_at <= ? ORDER BY next_at, id LIMIT ?", (now, limit))
        # One bound parameter, a JSON array, whatever the batch size (SQLite bounds the
        # number of parameters of a statement).
        return self._rows(
            "WHERE next_at <= ? AND id NOT IN (SELECT value FROM json_each(?))"
            " ORDER BY next_at, id LIMIT ?",
            (now, json.dumps(list(exclude)), limit),
        )

    def rows(self, limit: int = -1, after: int = 0) -> list[Row]:
        return self._rows("WHERE id > ? ORDER BY id LIMIT ?", (after, limit))

    def _rows(self, where: str, params: tuple[Any, ...]) -> list[Row]:
        # ``where`` is one of this module's constants; every value is a bound parameter.
        query = f"SELECT {_COLUMNS} FROM spool {where}"  # noqa: S608
        conn = self._connect()
        with self._watch():
            fetched = conn.execute(query, params).fetchall()
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
            for r in fetched
        ]

    def _counts(self) -> tuple[int, float | None]:
        """Depth and oldest first_seen, without a scan of the table: the depth the triggers
        keep, the oldest from its index (a few pages, whatever the spool's size)."""
        conn = self._connect()
        with self._watch():
            depth = conn.execute("SELECT depth FROM spool_depth").fetchone()[0]
            oldest = conn.execute("SELECT min(first_seen) FROM spool").fetchone()[0]
        return int(depth), None if oldest is None else float(oldest)

    def stats(self, counts: bool = True) -> Stats:
        """Depth, oldest, size, room. ``counts=False``: size and room only (``depth`` -1,
        ``oldest`` None, ``damaged`` 0), for the drainer's check between two batches
        (without the look at the directory for set-aside files)."""
        depth, oldest, damaged = -1, None, []
        if counts:
            depth, oldest = self._counts()
            damaged = self.damaged_files()
        times = [t for t in map(set_aside_at, damaged) if t is not None]
        return Stats(
            depth=depth,
            oldest=None if oldest is None else float(oldest),
            used_bytes=self._used_bytes(),
            max_bytes=self.max_bytes,
            damaged=len(damaged),
            free_bytes=free_bytes(self.directory),
            damaged_files=tuple(p.name for p in damaged),
            damaged_since=min(times, default=None),
            headroom=batch_bytes(self.batch_size, self.statement_bytes),
        )
