"""The drainer: a thread of the worker's main process that delivers the node's spool to
the LRS, oldest first, in batches, while live statements keep flowing through the pool.

Each turn it also:

- publishes the spool's state to the broker (hash ``xapi.inflight.<node>.spool``: depth,
  oldest, bytes, max_bytes, full, damaged, damaged_files, damaged_since, updated, and the
  node's dead letters: dead_letters, dead_new, dead_oldest, dead_bytes, dead_max_bytes,
  dead_full), which ``xapi-worker status``, ``playbooks/status.yml`` and ``check_xapi``
  read: the spool itself is readable by the worker's user only;
- stops the node taking from the broker while the spool is full (transport.TAKING), or its
  disk is (less than a batch's worth above spool.DISK_RESERVE_BYTES free), or its dead
  letters are (deadstore.DeadStats), and starts it again once a tenth of the spool (of the
  dead letters' limit), and 8 MiB above that reserve, are free (one rule, with Spool.add()'s
  refusal: spool.Stats): statements then wait in Redis, none is dropped;
- moves the dead letters of the broker's list to the node's disk (deadstore.move_legacy);
- purges the dead letters older than ``XAPI_WORKER_DEAD_LETTER_RETENTION_DAYS`` (hourly).

A spooled statement is deleted only once the LRS holds it, or once its dead letter is
written; a failure reschedules it with the same backoff as a live retry.

While a batch is at the LRS, a second thread ("ahead") does the spool's bookkeeping: it
deletes the previous batch's settled rows and reads the next batch, work that the LRS's
time then hides (how much: docs/benchmarks.md, "The drainer's second thread"). The POSTs
stay one at a time and oldest first. A crash between a batch's 200 and its deletion sends
that batch again: the statements keep their ids, the LRS stores them once (the same window
as a crash just before a deletion).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from celery import Celery

from . import events, names
from .batch import Processor
from .deadstore import (
    MOVE_PER_TURN,
    DeadStats,
    DiskDeadLetters,
    disk_dead_letters,
    move_legacy,
)
from .delivery import Item, merge_duplicates
from .names import QUEUE, dead_claim_key, spool_state_key, unreadable_key
from .retention import Retention
from .retries import Reschedule
from .scripts import set_fields
from .settings import Settings
from .settle import keys
from .spool import (
    DISK_RESERVE_BYTES,
    RESUME_SHARE,
    SHRINK_ABOVE_BYTES,
    Row,
    Spool,
    SpoolFull,
    Stats,
)
from .transport import TAKING

log = logging.getLogger("xapi_worker.spool")

STATE_EVERY = 5.0  # seconds between two publications of the spool's state
PURGE_EVERY = 3600.0  # seconds between two purges of expired dead letters
IDLE_WAIT = 1.0  # seconds between two looks at an empty or not yet due spool


class DrainProcessor(Processor):
    """The live Processor's rules, applied to spooled rows: a retry reschedules the row
    (retries.Reschedule) instead of spooling it again."""

    def __init__(self, app: Celery, settings: Settings, spool: Spool) -> None:
        self.reschedule = Reschedule(spool, settings)
        super().__init__(app, settings, spool, self.reschedule)
        # A row's dead letter and the row's deletion: one transaction (deadstore.py).
        self.settler.rows = lambda item: [int(k) for k in keys(item)]

    def deliver(self, rows: Sequence[Row]) -> list[int]:
        """One batch of the spool to the LRS; returns the ids of the rows it settled (the
        LRS holds them, or their dead letter is written), which the caller deletes. The
        others are rescheduled or left as they were."""
        self.reschedule.rescheduled = set()
        items = [
            Item(str(r.id), r.statement, r.attempts, r.first_seen, r.lone_failures) for r in rows
        ]
        self._batch = len(items)
        now = time.time()
        try:
            keep = set(self.run(merge_duplicates(items), now))
        finally:
            self.metrics.flush()
        # Kept: their dead letter could not be written (the node's dead letters full): not
        # sent again at once, but after the longest retry delay (the node stops taking
        # meanwhile, drain.py).
        kept = [
            r.id for r in rows if str(r.id) in keep and str(r.id) not in self.reschedule.rescheduled
        ]
        if kept:
            assert self.spool is not None
            self.spool.reschedule(
                kept,
                now + self.settings.retry_max_seconds,
                "its dead letter could not be written (dead letters full)",
                attempt_step=0,
            )
            self.reschedule.rescheduled.update(map(str, kept))
        return [r.id for r in rows if str(r.id) not in keep | self.reschedule.rescheduled]

    def drain(self, rows: Sequence[Row]) -> tuple[int, int]:
        """One batch of the spool, its settled rows deleted: returns (settled, still
        spooled)."""
        settled = self.deliver(rows)
        assert self.spool is not None
        self.spool.delete(settled)
        return len(settled), len(rows) - len(settled)


class Drainer:
    """The thread; :meth:`step` is one turn."""

    def __init__(self, app: Celery, settings: Settings, spool: Spool | None, node: str) -> None:
        self.settings = settings
        self.node = node
        # A Spool of its own: an SQLite connection serves the thread that made it.
        self.spool = (
            Spool(spool.directory, node, spool.max_bytes, spool.batch_size, spool.statement_bytes)
            if spool is not None
            else None
        )
        if self.spool is not None:
            self.processor: Processor = DrainProcessor(app, settings, self.spool)
        else:
            self.processor = Processor(app, settings)
        # The node's dead letters on its disk (None without a spool: the broker's list).
        self.dead: DiskDeadLetters | None = (
            disk_dead_letters(self.spool, settings) if self.spool is not None else None
        )
        self._dead_stats: DeadStats | None = None
        # The bookkeeping thread's own Spool: its connection is made, used and closed there.
        self._ahead_spool = (
            Spool(spool.directory, node, spool.max_bytes, spool.batch_size, spool.statement_bytes)
            if spool is not None
            else None
        )
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xapi-spool-ahead")
        self._next: Future[list[Row]] | None = None  # the batch after the one at the LRS
        self._settled: list[int] = []  # delivered, not yet deleted (the ahead thread's next job)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xapi-spool-drainer", daemon=True)
        self._next_state = 0.0
        self._next_purge = 0.0
        self._full_logged = -1e9
        self._move_warned = -1e9  # monotonic: the last "dead letters stay in the broker"
        self._woken = False
        self._stopping = False
        self.paused = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            wait = self.settings.connect_timeout + self.settings.read_timeout + 5
            self._thread.join(timeout if timeout is not None else wait)
        elif self._thread.ident is None:  # never started
            self._ahead.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.step()
            except Exception:
                log.exception("spool drainer: unexpected error; trying again in 5 s")
                wait = 5.0
            self._stop.wait(wait)
        self._finish()

    def _finish(self) -> None:
        """Stopping, in the drainer thread (an SQLite connection serves the thread that made
        it): what was delivered is deleted, the connections are closed."""
        self._read_ahead()
        try:
            self._settle_now()
        except Exception:
            log.warning("spool: delivered rows not deleted; they are sent again", exc_info=True)
        if self.spool is not None:
            self.spool.close()
        if self._ahead_spool is not None:
            self._ahead.submit(self._ahead_spool.close).result()
        self._ahead.shutdown(wait=True)

    # --- one turn ----------------------------------------------------------------------------
    def step(self, now: float | None = None) -> float:
        """Purge, gate, publish, drain one batch; returns how long to wait before the next."""
        now = time.time() if now is None else now
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY
            self.purge_expired()
        if self.spool is None:
            return STATE_EVERY
        if self.spool.check_pending():
            self._stop_for_check()
            return STATE_EVERY
        if not self._woken:
            self._woken = True
            self.wake_parked()
        # Size and room between two batches; depth and oldest (two scans of the table) only
        # when they are published, or looked at: an idle spool, a full one.
        counted = now >= self._next_state
        stats = self.spool.stats(counts=counted)
        if stats.full and not counted:
            stats, counted = self.spool.stats(), True
        dead = self._dead_stats_now(now, counted)
        self._gate(stats, dead)
        if counted:
            self._next_state = now + STATE_EVERY
            self.move_dead_letters()
            self.publish(stats, dead)
        rows = self._read_ahead()
        if rows is None:
            rows = self.spool.due(self.settings.batch_size, now)
        if not rows:
            self._settle_now()
            # Nothing due: give back what deleted rows took (the spool shrinks after a drain).
            if self.spool.reclaimable() > SHRINK_ABOVE_BYTES:
                self.spool.compact()
            return IDLE_WAIT
        assert isinstance(self.processor, DrainProcessor)
        # While this batch is at the LRS: the last one's deletion, the next one's read.
        settled_before, self._settled = self._settled, []
        self._next = self._ahead.submit(self._bookkeep, settled_before, [r.id for r in rows])
        settled = self._settled = self.processor.deliver(rows)
        kept = len(rows) - len(settled)
        if settled:
            log.info("spool: %d settled (%d of the batch kept for later)", len(settled), kept)
        if kept:
            # The LRS failed some: the next turn reads the spool afresh (the read ahead
            # may hold rows that are due no more by then) and deletes what it settled.
            self._read_ahead()
            self._settle_now()
        return 0.0 if settled else IDLE_WAIT

    def _stop_for_check(self) -> None:
        """SQLite said the spool is damaged (spool.Spool.check_pending): this node takes
        nothing more and stops (warm shutdown: what it holds goes back to the broker); its
        next start (systemd's Restart=) reads the file whole and sets it aside if it is."""
        TAKING.clear()
        self.paused = True
        if not self._stopping:
            self._stopping = True
            log.critical(
                "spool %s is damaged: this node stops; at its next start the file is checked "
                "and set aside, and `xapi-worker spool drain` delivers what it still holds",
                self.spool.path if self.spool else "-",
            )
            os.kill(os.getpid(), signal.SIGTERM)

    def wake_parked(self) -> None:
        """At start: rows parked beyond the longest retry delay (an LRS's Retry-After, up to
        XAPI_WORKER_RETRY_AFTER_MAX_SECONDS, by the process before this one) are due now; the
        first batch asks the LRS afresh, and a failure parks them again with the backoff."""
        assert self.spool is not None
        woken = self.spool.wake(beyond=self.settings.retry_max_seconds)
        if woken:
            log.info("spool: %d statements parked by an earlier run are due now", woken)

    # --- the bookkeeping thread ----------------------------------------------------------------
    def _bookkeep(self, settled: list[int], at_lrs: list[int]) -> list[Row]:
        """In the ahead thread: delete what the LRS holds, read the next batch."""
        assert self._ahead_spool is not None
        self._ahead_spool.delete(settled)
        return self._ahead_spool.due(self.settings.batch_size, exclude=at_lrs)

    def _read_ahead(self) -> list[Row] | None:
        """The batch the ahead thread read (None: none pending, or its job failed)."""
        future, self._next = self._next, None
        if future is None:
            return None
        try:
            return future.result()
        except Exception:
            # Its deletion failed (the rows stay and are sent again: idempotent at the LRS)
            # or its read did: this turn reads in its own thread.
            log.warning("spool bookkeeping failed; the drainer reads afresh", exc_info=True)
            return None

    def _settle_now(self) -> None:
        """Delete, in this thread, what was delivered and not yet deleted."""
        settled, self._settled = self._settled, []
        if settled and self.spool is not None:
            self.spool.delete(settled)

    def _dead_stats_now(self, now: float, counted: bool) -> DeadStats | None:
        if self.dead is None:
            return None
        try:
            dead = self.dead.stats(now, counts=counted)
            days = self.settings.dead_letter_retention_days
            if dead.full and days and self.dead.purge_older(days, now):
                # Full: the expired ones go first, without waiting for the hourly pass.
                dead = self.dead.stats(now, counts=counted)
            self._dead_stats = dead
        except Exception:
            log.warning("dead letters of %s not read", self.dead.spool.path, exc_info=True)
        return self._dead_stats

    def move_dead_letters(self) -> None:
        """The dead letters of the broker's list to this node's disk (deadstore.py): those
        of a worker before this format, or of a node without a spool. Best effort."""
        if self.dead is None:
            return
        client = self.processor.dead.client
        legacy = self.settings.dead_letter_key
        claim = dead_claim_key(QUEUE, self.node)
        try:
            if not client.llen(legacy) and not client.llen(claim):
                return
            # Only while this node's dead letters stay roomy: moved past that, they would
            # stop the node taking live statements (DeadStats.full), every node in turn.
            moved = move_legacy(client, legacy, claim, self.dead, MOVE_PER_TURN, roomy=True)
            left = 0 if moved >= MOVE_PER_TURN else int(client.llen(legacy))  # type: ignore[arg-type]
        except SpoolFull as exc:
            log.error("%s: the broker's dead letters stay in %s", exc, legacy)
            return
        except Exception:
            log.warning("dead letters of %s not moved this time", legacy, exc_info=True)
            return
        now = time.monotonic()
        if left and now - self._move_warned >= 60:
            self._move_warned = now
            log.warning(
                "%d dead letters stay in the broker's %s: this node's dead letters (%s) have "
                "no room for them below %d%% of XAPI_WORKER_DEAD_LETTER_MAX_MB (%d MiB) less "
                "one batch; replay or purge them (`xapi-worker dead-letters`)",
                left,
                legacy,
                self.dead.spool.path,
                round(RESUME_SHARE * 100),
                self.dead.max_bytes // 1024**2,
            )

    def _gate(self, stats: Stats, dead: DeadStats | None = None) -> None:
        dead_full = dead is not None and dead.full
        if stats.full or dead_full:
            if not self.paused:
                self.paused = True
                TAKING.clear()
            now = time.monotonic()
            if dead_full and not stats.full and now - self._full_logged >= 60:
                assert dead is not None
                self._full_logged = now
                log.critical(
                    "dead letters of node %s FULL (%d, %d of %d MiB, "
                    "XAPI_WORKER_DEAD_LETTER_MAX_MB; none expired): this node takes nothing "
                    "from the broker until they are replayed or purged (`xapi-worker "
                    "dead-letters`) or expire; statements wait in Redis, none is dropped",
                    self.node,
                    dead.count,
                    dead.bytes // 1024**2,
                    dead.max_bytes // 1024**2,
                )
                events.emit(
                    "dead_letters_full",
                    logging.CRITICAL,
                    node=self.node,
                    count=dead.count,
                    bytes=dead.bytes,
                    max_bytes=dead.max_bytes,
                )
            elif stats.full and now - self._full_logged >= 60:
                self._full_logged = now
                why = (
                    f"its disk has {stats.free_bytes // 1024**2} MiB free, under the "
                    f"{DISK_RESERVE_BYTES // 1024**2} MiB it leaves plus room for one batch "
                    f"of the largest statements ({stats.headroom / 1024**2:.1f} MiB)"
                    if stats.disk_full
                    else f"{stats.used_bytes // 1024**2} of {stats.max_bytes // 1024**2} MiB, "
                    f"less than one batch of the largest statements "
                    f"({stats.headroom / 1024**2:.1f} MiB) from its limit"
                )
                # The file holds the node's dead letters too: the LRS taking the spool
                # frees none of their bytes.
                held = (
                    f"; {dead.bytes // 1024**2} MiB of the file are {dead.count} dead letters "
                    "(XAPI_WORKER_DEAD_LETTER_MAX_MB within XAPI_WORKER_SPOOL_MAX_MB), which "
                    "only their replay, purge (`xapi-worker dead-letters`) or expiry frees"
                    if dead is not None and dead.count and not stats.disk_full
                    else ""
                )
                log.error(
                    "spool %s FULL (%d statements, %s%s): this node takes nothing from the "
                    "broker until the LRS takes the spool or the disk has room; statements "
                    "wait in Redis, none is dropped",
                    self.spool.path if self.spool else "-",
                    stats.depth,
                    why,
                    held,
                )
                events.emit(
                    "spool_full",
                    logging.ERROR,
                    node=self.node,
                    depth=stats.depth,
                    bytes=stats.used_bytes,
                    max_bytes=stats.max_bytes,
                    disk_free=stats.free_bytes,
                )
        elif self.paused and stats.roomy and (dead is None or dead.roomy):
            self.paused = False
            TAKING.set()
            log.warning("spool has room again: this node takes from the broker again")

    def publish(self, stats: Stats, dead: DeadStats | None = None) -> None:
        """The spool's state and the node's dead letters, for status and monitoring (full:
        the node takes nothing, for either). Best effort."""
        dead_full = dead is not None and dead.full
        values = {
            names.SPOOL_DEPTH: str(stats.depth),
            names.SPOOL_OLDEST: "" if stats.oldest is None else repr(stats.oldest),
            names.SPOOL_BYTES: str(stats.used_bytes),
            names.SPOOL_MAX_BYTES: str(stats.max_bytes),
            names.SPOOL_FULL: "1" if stats.full or dead_full else "0",
            names.SPOOL_DAMAGED: str(stats.damaged),
            # names (no spaces: spool.node_file) and when the oldest was set aside
            names.SPOOL_DAMAGED_FILES: " ".join(stats.damaged_files),
            names.SPOOL_DAMAGED_SINCE: (
                "" if stats.damaged_since is None else repr(stats.damaged_since)
            ),
            names.SPOOL_UPDATED: repr(time.time()),
        }
        if dead is not None:
            values.update(
                {
                    names.SPOOL_DEAD_LETTERS: str(dead.count),
                    names.SPOOL_DEAD_NEW: str(dead.new),
                    names.SPOOL_DEAD_OLDEST: "" if dead.oldest is None else repr(dead.oldest),
                    names.SPOOL_DEAD_BYTES: str(dead.bytes),
                    names.SPOOL_DEAD_MAX_BYTES: str(dead.max_bytes),
                    names.SPOOL_DEAD_FULL: "1" if dead_full else "0",
                }
            )
        try:
            set_fields(self.processor.dead.quick_client, spool_state_key(QUEUE, self.node), values)
        except Exception:
            log.debug("spool state not published", exc_info=True)

    def purge_expired(self) -> None:
        days = self.settings.dead_letter_retention_days
        # The same rule for what is set aside (retention.py): damaged spool files, and
        # xapi.unreadable (dated on the first pass, so that it can expire).
        spool_file = self.spool.path if self.spool is not None else None
        try:
            Retention(self.processor.dead.client, unreadable_key(QUEUE), spool_file).run(days)
        except Exception:
            log.warning("retention of what is set aside not applied this time", exc_info=True)
        if not days:
            return
        stores: list[tuple[str, Callable[[float], int]]] = []
        if self.dead is not None:
            stores.append((str(self.dead.spool.path), self.dead.purge_older))
        # The broker's list: a node without a spool, or one of an older release, writes there.
        stores.append((self.settings.dead_letter_key, self.processor.dead.purge_older))
        for where, purge_older in stores:
            try:
                purged = purge_older(days)
            except Exception:
                log.warning("expired dead letters of %s not purged this time", where, exc_info=True)
                continue
            if purged:
                log.info(
                    "purged %d dead letters of %s older than %d days (retention)",
                    purged,
                    where,
                    days,
                )
