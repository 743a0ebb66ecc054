"""A learner's right to erasure: ``xapi-worker forget`` removes the statements of one learner
from everything this host's worker keeps of them (GDPR, article 17).

Where a statement can wait, on the broker of the worker's settings and on this host:

- the queue ``xapi`` (and kombu's priority variants of it), as kombu messages;
- the in-flight lists of the worker nodes (``xapi.inflight.<node>``: taken, not yet
  recorded) and kombu's ``unacked`` hash (recorded, in a worker's hands or waiting for a
  retry's countdown), with its index ``unacked_index``;
- the spools of this host's nodes (``XAPI_WORKER_SPOOL_DIR``), and the dead letters they
  keep (deadstore.py);
- the dead letters of the broker's list (``XAPI_WORKER_DEAD_LETTER_KEY``), with the
  nodes' claim lists of it (``<in-flight list>.dead_letters``: elements on their way to a
  node's disk), and ``xapi.unreadable``.

Safe while the workers run. Nothing is rewritten wholesale: each element is removed by its
exact value (``LREM``), a record of ``unacked`` only if it is still the one read (one
script), a spooled row by its id (never reused). So an element of anyone else, taken or
added meanwhile, is neither lost nor duplicated, and an element of the learner that moves
while it is looked for (the queue to a node's hands, the spool to the dead letters) is met
further down: the places are visited in the order statements travel.

A record of ``unacked`` that a worker holds (in a batch, or waiting for a retry's
countdown) is left to it: forget waits until the worker settles it (the record leaves
``unacked`` only once its statement is at the LRS, committed to the spool, in the dead
letters or back on the queue), then makes another pass, which meets it where it went. A
statement the LRS stored meanwhile is at the LRS. The LRS itself, backups of the broker or
of the spool, and Pod's own Redis are out of reach (operator guide, "Erasing a learner's
statements").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

from .consumer import BODY
from .content import STATEMENT_HEAD
from .deadstore import DiskDeadLetters, disk_dead_letters
from .names import DEAD_CLAIM, QUEUE, UNACKED, UNACKED_INDEX, registry_key, unreadable_key
from .retention import unwrap
from .settings import Settings
from .spool import SALVAGED, Spool, SpoolError

log = logging.getLogger("xapi_worker.forget")

#: Elements read per LRANGE, records per HGET pipeline, rows per spool read.
CHUNK = 500
#: Passes at most: a pass is made again only once what the one before found of the
#: learner's in a worker's hands is settled.
MAX_PASSES = 5
#: How often forget looks whether a worker settled what it held.
SETTLE_POLL_SECONDS = 0.2
#: The keys of an agent that identify it (xAPI 1.0.3, "Inverse Functional Identifier").
IFI_KEYS = ("mbox", "mbox_sha1sum", "openid", "account")
#: Keys whose value is an agent or a group (or a list of them), whatever it carries.
AGENT_KEYS = ("actor", "instructor", "authority", "team", "member")

# KEYS[1] unacked, KEYS[2] unacked_index; ARGV[1] tag, ARGV[2] the record read. Removes the
# record only if it is still the one read (a message acknowledged meanwhile, or recorded
# again under this tag, is left alone). HGET, HDEL and ZREM: the workers' ACL has them.
_REMOVE_RECORD = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

#: The places, in the order statements travel through them, and the order of the report.
PLACES = ("queue", "in_flight", "unacked", "spool", "dead_letters", "unreadable")


class LearnerError(ValueError):
    """The learner given cannot be matched (the message names the field, never its value)."""


def _mbox(value: str) -> str:
    address = value.strip()
    if address.lower().startswith("mailto:"):
        address = address[len("mailto:") :]
    return "mailto:" + address.lower()


@dataclass(frozen=True)
class Learner:
    """Who to forget: an mbox, an account (home page and name), or both, and a name.
    A statement is the learner's when an agent or group in it (its actor, an agent as its
    object, an instructor, a team, a member, a sub-statement's) carries the mbox (or its
    ``mbox_sha1sum``) or the account. A name given with them is not used (:attr:`name_ignored`):
    it would only narrow, and a learner's statements carrying another name (Pod writes the
    user name, an address or a hash there; a name changed since, a stray space, an agent with
    none) would be missed and the erasure said complete. A name alone matches every agent of
    that name, the learner's homonyms too: taken only when the caller says names are unique
    (``name_is_unique``: Pod's ``XAPI_ANONYMIZE_ACTOR`` writes a hash as the name)."""

    mbox: str | None = None  # "mailto:" + the address, lower case
    home_page: str | None = None
    account_name: str | None = None
    name: str | None = None
    sha1: frozenset[str] = field(default=frozenset(), compare=False)
    name_ignored: bool = field(default=False, compare=False)  # given with an mbox or account

    @classmethod
    def of(cls, data: Mapping[str, Any], *, name_is_unique: bool = False) -> Learner:
        """From an agent-like object: ``{"mbox": ...}``, ``{"account": {"homePage": ...,
        "name": ...}}``, or both, with or without ``"name"``; ``{"name": ...}`` alone only
        with ``name_is_unique`` (else :class:`LearnerError`: it would erase the statements
        of every learner of that name)."""
        if not isinstance(data, Mapping):
            raise LearnerError("the learner must be a JSON object")
        unknown = set(data) - {"mbox", "account", "name", "objectType"}
        if unknown:
            raise LearnerError(f"unknown field(s) {', '.join(sorted(unknown))}")
        mbox = data.get("mbox")
        account = data.get("account")
        name = data.get("name")
        if mbox is not None and (not isinstance(mbox, str) or "@" not in mbox):
            raise LearnerError("mbox must be an e-mail address (mailto:name@host)")
        home_page = account_name = None
        if account is not None:
            if not isinstance(account, Mapping) or set(account) != {"homePage", "name"}:
                raise LearnerError("account must be {homePage, name}")
            home_page, account_name = account["homePage"], account["name"]
            if not (isinstance(home_page, str) and home_page and isinstance(account_name, str)):
                raise LearnerError("account.homePage and account.name must be strings")
            if not account_name:
                raise LearnerError("account.name is empty")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise LearnerError("name must be a non-empty string")
        if mbox is None and account is None and name is None:
            raise LearnerError("give an mbox, an account or a name")
        if mbox is None and account is None and not name_is_unique:
            raise LearnerError(NAME_ALONE)
        sha1: set[str] = set()
        if mbox is not None:
            # mbox_sha1sum is the SHA-1 of the mbox as the producer wrote it: the address as
            # given, and in lower case.
            given = mbox.strip()
            if not given.lower().startswith("mailto:"):
                given = "mailto:" + given
            for form in (given, _mbox(mbox)):
                sha1.add(hashlib.sha1(form.encode(), usedforsecurity=False).hexdigest())
        return cls(
            mbox=_mbox(mbox) if mbox is not None else None,
            home_page=home_page.rstrip("/") if home_page is not None else None,
            account_name=account_name,
            name=None if (mbox is not None or account is not None) else name,
            sha1=frozenset(sha1),
            name_ignored=name is not None and (mbox is not None or account is not None),
        )

    def __repr__(self) -> str:  # personal data: never in a log or a traceback
        return "Learner(<hidden>)"

    # --- matching ---------------------------------------------------------------------------
    @property
    def _identified(self) -> bool:
        """An mbox or an account was given: those identify (a name given with them is not
        kept: :meth:`of`)."""
        return self.mbox is not None or self.home_page is not None

    def _is(self, agent: Mapping[str, Any]) -> bool:
        if self.name is not None and agent.get("name") != self.name:
            return False  # a name alone (with name_is_unique): it is all there is
        if not self._identified:
            return True
        if self.mbox is not None:
            mbox = agent.get("mbox")
            if isinstance(mbox, str) and _mbox(mbox) == self.mbox:
                return True
            digest = agent.get("mbox_sha1sum")
            if isinstance(digest, str) and digest.lower() in self.sha1:
                return True
        if self.home_page is not None:
            account = agent.get("account")
            if (
                isinstance(account, Mapping)
                and account.get("name") == self.account_name
                and isinstance(account.get("homePage"), str)
                and account["homePage"].rstrip("/") == self.home_page
            ):
                return True
        return False

    def matches(self, value: Any) -> bool:  # noqa: ANN401 (any JSON value)
        """True when ``value`` (a statement, a message, a dead letter: any JSON value) holds an
        agent or group of this learner. Walked without recursion: any depth."""
        stack: list[tuple[Any, bool]] = [(value, False)]
        while stack:
            node, agent_place = stack.pop()
            if isinstance(node, Mapping):
                agent_like = (
                    agent_place
                    or node.get("objectType") in ("Agent", "Group")
                    or any(k in node for k in IFI_KEYS)
                )
                if agent_like and self._is(node):
                    return True
                for key, child in node.items():
                    if isinstance(child, (Mapping, list)):
                        stack.append((child, key in AGENT_KEYS))
            elif isinstance(node, list):
                stack.extend((child, agent_place) for child in node)
        return False

    def in_text(self, text: str) -> bool:
        """For an element that is no JSON (the head of a message's body, a message set aside
        unread): the learner's identifiers appear in it as whole values, never inside
        another (``alice@example.org`` is not in ``malice@example.org``): the mbox's address
        (in any case) or its SHA-1 as a token, the account's home page and name as quoted
        JSON strings, both; and the name, when given, as a quoted JSON string too."""
        if self.name is not None and not _quoted(self.name, text):
            return False
        if not self._identified:
            return True
        if self.mbox is not None:
            address = re.escape(self.mbox[len("mailto:") :])
            if re.search(_ADDRESS_BEFORE + address + _ADDRESS_AFTER, text, re.IGNORECASE):
                return True
            digests = "|".join(sorted(self.sha1))
            if re.search(rf"(?<![0-9A-Fa-f])(?:{digests})(?![0-9A-Fa-f])", text, re.IGNORECASE):
                return True
        if self.home_page is not None and self.account_name is not None:
            home = (self.home_page, self.home_page + "/")
            if any(_quoted(h, text) for h in home) and _quoted(self.account_name, text):
                return True
        return False


#: What a name alone is refused with (Learner.of), naming the option that takes it.
NAME_ALONE = (
    "a name alone matches every learner of that name (homonyms' statements would be erased "
    "too): give the mbox or the account (a name with them is not used), or say that "
    "names are unique on this site (XAPI_ANONYMIZE_ACTOR: a hash as the name) with "
    "--name-is-unique (playbooks/forget.yml: -e name_is_unique=true)"
)
# An address in text is whole when no character of an address's local part comes before it
# and none of its domain after it (a dot followed by more domain: a longer domain).
_ADDRESS_BEFORE = r"(?<![\w.!#$%&'*+/=?^`{|}~-])"
_ADDRESS_AFTER = r"(?![\w-]|\.[\w-])"


def _quoted(value: str, text: str) -> bool:
    """``value`` is in ``text`` as a JSON string, whole: ``"value"``, escaped or not, or one
    level deeper (a JSON text inside a JSON string: ``\\"value\\"``)."""
    for form in {json.dumps(value), json.dumps(value, ensure_ascii=False)}:
        if form in text or json.dumps(form)[1:-1] in text:
            return True
    return False


def decode(raw: bytes | str) -> Any | None:  # noqa: ANN401 (any JSON value)
    """What an element of the broker holds, as JSON: a kombu message's body decoded (a task's
    ``[args, kwargs, embed]``), an ``unacked`` record's message likewise, a dead letter as it
    is. None when it is no JSON (or too deep to read)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    candidates = [value]
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        candidates.append(value[0])  # an unacked record: [payload, exchange, routing_key]
    for message in candidates:
        if not isinstance(message, Mapping) or not isinstance(message.get("body"), str):
            continue
        body: str | bytes = message["body"]
        properties = message.get("properties")
        if isinstance(properties, Mapping) and properties.get("body_encoding") == "base64":
            try:
                body = base64.b64decode(body, validate=False)
            except (binascii.Error, ValueError):
                return value
        try:
            return [value, json.loads(body)]
        except (ValueError, RecursionError):
            return value
    return value


def belongs(learner: Learner, raw: bytes | str) -> bool:
    if isinstance(raw, bytes):
        raw, _ = unwrap(raw)  # an element of xapi.unreadable, dated (retention.py)
    value = decode(raw)
    if value is None:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return learner.in_text(text)
    if learner.matches(value):
        return True
    # The dead letter of a message the worker could not read keeps the head of its body as
    # text (consumer.py): the learner's agent is in that text, not in the JSON around it.
    # So does the summary of a statement too large to keep (content.bounded) when its actor
    # was too large to keep too.
    statement = value.get("statement") if isinstance(value, Mapping) else None
    if not isinstance(statement, Mapping):
        return False
    body = statement.get(BODY)
    if isinstance(body, str) and (belongs(learner, body) or learner.in_text(body)):
        return True
    head = statement.get(STATEMENT_HEAD)
    return isinstance(head, str) and learner.in_text(head)


@dataclass
class Report:
    """How many of the learner's statements were removed where, over every pass."""

    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PLACES, 0))
    passes: int = 0
    #: in a worker's hands when forget stopped waiting for them (see Forgetter.run): their
    #: records were removed from unacked, but that worker may still settle them
    in_hands: int = 0
    spool_files: int = 0
    #: set-aside damaged spool files: not opened, may hold the learner's statements
    spool_damaged_files: int = 0
    #: set-aside files `spool drain` emptied (``.salvaged``): what it could read of them is
    #: in the spool (erased there), but the file, not opened, still holds copies
    spool_salvaged_files: int = 0
    #: spool files of this host it could not read (damaged, locked, of a newer format)
    spool_files_not_read: int = 0
    spool_enabled: bool = True

    @property
    def complete(self) -> bool:
        """Nothing of the learner's may be left: none in a worker's hands, no spool file
        (live or set aside as damaged) that may hold some and was not read."""
        return not (
            self.in_hands
            or self.spool_files_not_read
            or self.spool_damaged_files
            or self.spool_salvaged_files
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed": dict(self.removed),
            "total": sum(self.removed.values()),
            "passes": self.passes,
            "in_workers_hands": self.in_hands,
            "spool_files": self.spool_files if self.spool_enabled else None,
            "spool_damaged_files_not_read": self.spool_damaged_files,
            "spool_salvaged_files_not_read": self.spool_salvaged_files,
            "spool_files_not_read": self.spool_files_not_read,
        }


class Forgetter:
    """One learner, one broker (the settings' URL), this host's spools."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        learner: Learner,
        wait_seconds: float = 120.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.client = client
        self.learner = learner
        self.wait_seconds = wait_seconds
        self._clock = clock
        self._sleep = sleep
        self._remove_record = client.register_script(_REMOVE_RECORD)

    def run(self) -> Report:
        """Passes over every place, in the order statements travel. A record of unacked
        that a worker holds (recorded less than the visibility timeout ago) is not removed
        under it: forget waits until that worker settles it (its record leaves unacked only
        once its statement is at the LRS, in the spool, in the dead letters or back on the
        queue), then makes another pass, which meets it there. After ``wait_seconds`` in
        all (or MAX_PASSES passes), what is still held is removed from unacked and counted
        as ``in_hands``: the run is incomplete (the worker still has those messages, and
        settles them: a retry comes back on the queue), run forget again later. No pass,
        the last one included, takes a record a worker holds as removed (that reported
        a complete run while the worker re-published the learner's statements)."""
        report = Report(spool_enabled=self.settings.spool_enabled)
        give_up_at = self._clock() + self.wait_seconds
        for n in range(MAX_PASSES):
            report.passes = n + 1
            last = n == MAX_PASSES - 1
            held, moving = self._pass(report)
            if not held:
                if not moving or last:
                    break
                # A node was moving the learner's dead letters to its disk: the pass may
                # have removed one from its claim list after the node read it there, and
                # read the disk before the node committed it. The next pass reads the disk
                # again once that commit (a few milliseconds) is done.
                self._sleep(SETTLE_POLL_SECONDS)
                continue
            if not self._wait_settled(held, give_up_at) or last:
                # Each of them is in a worker's hands, or was moved on by it (a retry
                # re-published) since it was read: not reached, whatever the removal of its
                # record (which counts in removed when it was still there) says.
                self._remove_held(held, report)
                report.in_hands = len(held)
                break
        return report

    def _pass(self, report: Report) -> tuple[dict[bytes, tuple[bytes, float]], bool]:
        """One pass; returns the records a worker holds, and whether the learner's dead
        letters may have been on their way from the broker to a node's disk meanwhile (one
        removed from a claim list, which its node may have read already and commit after
        this pass read the disk; or the broker's list grown back): another pass then reads
        the disk again."""
        removed = report.removed
        for key in self._queues():
            removed["queue"] += self._lists_remove(key)
        for key in self._inflight_lists():
            removed["in_flight"] += self._lists_remove(key)
        count, held = self._unacked()
        removed["unacked"] += count
        # The broker's dead letters before the disks: they travel the list -> a node's claim
        # list -> its disk (deadstore.move_legacy), every few seconds.
        legacy = self.settings.dead_letter_key
        removed["dead_letters"] += self._lists_remove(legacy)
        after_list = int(self.client.llen(legacy))  # type: ignore[arg-type]
        moving = False
        for key in self._inflight_lists():
            claimed = self._lists_remove(key + DEAD_CLAIM)
            removed["dead_letters"] += claimed
            moving |= claimed > 0
        # A node whose disk was full put its claim back at the head of the list (read above).
        moving |= int(self.client.llen(legacy)) > after_list  # type: ignore[arg-type]
        if self.settings.spool_enabled:
            count, dead, files, (damaged, salvaged), not_read = self._spools()
            removed["spool"] += count
            removed["dead_letters"] += dead
            report.spool_files, report.spool_damaged_files = files, damaged
            report.spool_salvaged_files = salvaged
            report.spool_files_not_read = not_read
        removed["unreadable"] += self._lists_remove(unreadable_key(QUEUE))
        return held, moving

    def _wait_settled(self, held: dict[bytes, tuple[bytes, float]], give_up_at: float) -> bool:
        """Wait until every held record has left unacked (settled by its worker), or is
        older than the visibility timeout (its worker is gone: it is anyone's to take).
        False when ``give_up_at`` came first."""
        pending = dict(held)
        while pending:
            now = self._clock()
            pipe = self.client.pipeline(transaction=False)
            for tag in pending:
                pipe.hget(UNACKED, tag.decode())
            records = pipe.execute()  # type: ignore[no-untyped-call]
            for (tag, (record, score)), now_record in zip(
                list(pending.items()), records, strict=True
            ):
                expired = now - score >= self.settings.visibility_timeout
                if now_record != record or expired:
                    del pending[tag]
            if not pending:
                return True
            if now >= give_up_at:
                return False
            self._sleep(min(SETTLE_POLL_SECONDS, max(0.0, give_up_at - now)))
        return True

    def _remove_held(self, held: dict[bytes, tuple[bytes, float]], report: Report) -> int:
        still = 0
        for tag, (record, _) in held.items():
            if self._remove_record(keys=[UNACKED, UNACKED_INDEX], args=[tag, record]):
                report.removed["unacked"] += 1
                still += 1
        return still

    # --- the broker -------------------------------------------------------------------------
    @staticmethod
    def _queues() -> list[str]:
        sep = Channel.sep
        return [QUEUE] + [f"{QUEUE}{sep}{step}" for step in PRIORITY_STEPS[1:]]

    def _inflight_lists(self) -> list[str]:
        members: set[bytes] = self.client.smembers(registry_key(QUEUE))  # type: ignore[assignment]
        return sorted(m.decode() for m in members)

    def _lists_remove(self, key: str) -> int:
        """Remove the learner's elements of list ``key`` (:meth:`_read_remove`). The worker's
        own passes may remove elements near the head meanwhile (the hourly purge of the dead
        letters, the dating of ``xapi.unreadable``), which shifts the rest left past where
        this one reads: when the list lost more than this removed, it is read again (at most
        MAX_PASSES times)."""
        total = 0
        for _ in range(MAX_PASSES):
            before = int(self.client.llen(key))  # type: ignore[arg-type]
            removed = self._read_remove(key)
            total += removed
            if before - int(self.client.llen(key)) <= removed:  # type: ignore[arg-type]
                break
        return total

    def _read_remove(self, key: str) -> int:
        """Remove the learner's elements of list ``key``, read a chunk at a time from its left
        end, where producers push: a push moves the elements read to higher indices, so none
        is skipped (they may be read twice); consumers take from the right end, which moves
        none. Each element is removed by its exact value (every copy: the same message)."""
        total = start = 0
        while True:
            chunk: list[bytes] = self.client.lrange(key, start, start + CHUNK - 1)  # type: ignore[assignment]
            if not chunk:
                return total
            removed = 0
            for raw in dict.fromkeys(r for r in chunk if belongs(self.learner, r)):
                removed += int(self.client.lrem(key, 0, raw))  # type: ignore[arg-type]
            total += removed
            # What was removed shifted the rest left: read on from there (a copy removed
            # further on can only make some be read again, never skipped).
            start += len(chunk) - removed

    def _unacked(self) -> tuple[int, dict[bytes, tuple[bytes, float]]]:
        """Remove the learner's records from unacked that no worker holds (recorded more
        than the visibility timeout ago: their worker is gone); return how many, and those
        a worker holds, by tag (their record and its time), left in place. The tags are read
        at once (unacked holds what the workers prefetched: a few thousand at most), so the
        acknowledgements made meanwhile move none; the records a chunk at a time."""
        removed = 0
        held: dict[bytes, tuple[bytes, float]] = {}
        fresh_after = self._clock() - self.settings.visibility_timeout
        tags: list[tuple[bytes, float]] = self.client.zrevrangebyscore(
            UNACKED_INDEX, "+inf", "-inf", withscores=True
        )
        for start in range(0, len(tags), CHUNK):
            chunk = tags[start : start + CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for tag, _ in chunk:
                pipe.hget(UNACKED, tag.decode())
            records = pipe.execute()  # type: ignore[no-untyped-call]
            for (tag, score), record in zip(chunk, records, strict=True):
                if record is None or not belongs(self.learner, record):
                    continue
                if score > fresh_after:
                    held[tag] = (record, score)
                elif self._remove_record(keys=[UNACKED, UNACKED_INDEX], args=[tag, record]):
                    removed += 1
        return removed, held

    # --- this host's spools -------------------------------------------------------------------
    def _spools(self) -> tuple[int, int, int, tuple[int, int], int]:
        """Statements removed from this host's spools, dead letters removed from them, spool
        files, damaged files set aside (not drained, drained: ``.salvaged``), spool files that
        could not be read (the run is then incomplete: they may hold the learner's
        statements)."""
        directory = Path(self.settings.spool_dir)
        if not directory.is_dir():
            return 0, 0, 0, (0, 0), 0
        removed = dead = files = not_read = 0
        for path in sorted(directory.glob("*.sqlite3")):
            files += 1
            spool = Spool(directory, path.name.removesuffix(".sqlite3"))
            try:
                removed += self._spool_remove(spool)
                dead += self._dead_remove(disk_dead_letters(spool, self.settings))
            except (sqlite3.Error, SpoolError) as exc:
                not_read += 1
                log.error(
                    "spool %s not read (%s): the statements it holds are not reached",
                    spool.path,
                    type(exc).__name__,
                )
            finally:
                spool.close()
        set_aside = [
            p.name
            for p in directory.glob("*.sqlite3.damaged-*")
            if not p.name.endswith(("-wal", "-shm"))
        ]
        salvaged = sum(name.endswith(SALVAGED) for name in set_aside)
        return removed, dead, files, (len(set_aside) - salvaged, salvaged), not_read

    def _spool_remove(self, spool: Spool) -> int:
        """The learner's rows, found a chunk at a time without holding the write lock (the
        node's writers wait for no scan), then erased by id (ids are never reused: a row
        delivered and deleted meanwhile is simply not there)."""
        ids: list[int] = []
        after = 0
        while True:
            rows = spool.rows(CHUNK, after=after)  # an error: the file is not read (_spools)
            if not rows:
                break
            ids.extend(r.id for r in rows if self.learner.matches(r.statement))
            after = rows[-1].id
        return spool.erase(ids)

    def _dead_remove(self, store: DiskDeadLetters) -> int:
        """The learner's dead letters on this host's disk, found a chunk at a time, then
        erased by id (their content overwritten in the file, as the spool's rows)."""
        ids: list[int] = []
        after = 0
        while True:
            rows = store.rows(CHUNK, after=after)  # an error: the file is not read (_spools)
            if not rows:
                break
            # As an element of the broker's list (the same bytes, for one moved from there).
            ids.extend(row_id for row_id, raw in rows if belongs(self.learner, raw))
            after = rows[-1][0]
        return store.delete(ids, secure=True)
