"""Pure delivery logic: statement ids, HTTP answer classification, bisection of rejected
batches, retry delays. No I/O here: the HTTP exchange is a callable given by the caller."""

from __future__ import annotations

import enum
import hashlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from .content import MAX_STATEMENT_BYTES, problem

# Namespace of the ids given to statements that arrive without one: uuid5(NS, task id), so a
# redelivery of the same Celery message produces the same statement id (idempotent at the LRS).
STATEMENT_ID_NAMESPACE = uuid.UUID("6f1c2b0e-52f4-4c59-9a51-3f1f0c6e2d7a")


def ensure_statement_id(statement: dict[str, Any], task_id: str) -> str:
    """Give ``statement`` a deterministic id derived from ``task_id`` unless it has one."""
    current = statement.get("id")
    if isinstance(current, str) and current:
        return current
    new_id = str(uuid.uuid5(STATEMENT_ID_NAMESPACE, task_id))
    statement["id"] = new_id
    return new_id


class Kind(enum.Enum):
    OK = "ok"  # 200 naming ids that were sent, or 204 (every id already stored)
    REJECTED = "rejected"  # 400/409/413/422 and other 4xx: split the batch, then dead letter
    AUTH = "auth"  # 401/403: credentials; retried, never dropped
    CONFIG = "config"  # the request, not a statement, is refused: retried, never dropped
    TRANSIENT = "transient"  # network error, timeout, 408, 429, 5xx, unverified 2xx: retried


# Answers about the request as a whole, whatever statements it carries: a wrong URL (3xx,
# 404, 405), a proxy asking for credentials (407), a content type or protocol the server
# will not take (415, 426), headers too large (431). Splitting the batch cannot help, and
# dead-lettering would drop good statements for a configuration error.
CONFIG_STATUSES = frozenset({404, 405, 407, 415, 426, 431})
# A 400 that names the version header is about the request, not about a statement.
_VERSION_HEADER_HINT = "x-experience-api-version"


def classify(status: int | None, excerpt: str = "") -> Kind:
    """Map an HTTP status (``None`` = no answer: connection error or timeout) to a Kind."""
    if status is None:
        return Kind.TRANSIENT
    if 200 <= status < 300:
        return Kind.OK
    if status in (401, 403):
        return Kind.AUTH
    if status in CONFIG_STATUSES or 300 <= status < 400:
        return Kind.CONFIG
    if status == 400 and _VERSION_HEADER_HINT in excerpt.lower():
        return Kind.CONFIG
    if status in (408, 429) or status >= 500:
        return Kind.TRANSIENT
    return Kind.REJECTED


@dataclass(frozen=True)
class Answer:
    """What one HTTP exchange with the LRS gave."""

    status: int | None
    excerpt: str = ""
    retry_after: float | None = None
    latency_ms: float = 0.0
    error: str = ""  # exception class and message when there was no HTTP answer
    #: the statement ids a 200's body lists (None: the body is not a JSON array of strings)
    ids: tuple[str, ...] | None = None
    #: why a 2xx was not taken as a delivery (set by :func:`verified`)
    unverified: str = ""
    timed_out: bool = False  # no answer within the read timeout (the request was sent)

    @property
    def kind(self) -> Kind:
        if self.unverified:
            return Kind.TRANSIENT
        return classify(self.status, self.excerpt)

    @property
    def what(self) -> str:
        """A short description for logs and dead letters."""
        if self.unverified:
            return f"HTTP {self.status} not taken as a delivery: {self.unverified}"
        if self.status is None:
            return self.error[:160] or "no answer"
        return f"HTTP {self.status}"

    @property
    def group_key(self) -> tuple[Kind, int | None, str]:
        """Results with the same key are retried together (one delay, one log line)."""
        return (self.kind, self.status, self.unverified or self.error[:80])


def verified(answer: Answer, sent_ids: Collection[str]) -> Answer:
    """A 2xx counts as a delivery only when it says so in xAPI's terms: 204 (nothing new to
    store), or 200 with a JSON array of statement ids, each one of those sent. An LRS may list
    only the ids it newly stored (Ralph does), so a subset is accepted. Anything else (an
    HTML page from a proxy or an SSO portal, 201/202, ids never sent) is a transient failure:
    the statements stay queued."""
    if answer.kind is not Kind.OK or answer.status == 204:
        return answer
    if answer.status != 200:
        reason = "an LRS answers 200 or 204 to POST statements"
    elif answer.ids is None:
        reason = "the body is not a JSON array of statement ids"
    elif not set(answer.ids) <= set(sent_ids):
        reason = "the body lists statement ids that were not sent"
    else:
        return answer
    return replace(answer, unverified=reason)


@dataclass
class Item:
    """One statement in a batch, with what is known about its earlier attempts."""

    key: str  # opaque handle for the caller (the Celery task id)
    statement: dict[str, Any]
    attempt: int = 1
    first_seen: float = 0.0  # epoch seconds: when it was first queued or taken
    #: exchanges in which it failed alone while the LRS stored others (see deliver())
    lone_failures: int = 0
    followers: list[Item] = field(default_factory=list)  # same id and content, same batch

    @property
    def statement_id(self) -> str:
        return str(self.statement.get("id", ""))


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    DUPLICATE = "duplicate"  # 409, and the LRS holds the same statement: delivered earlier
    DEAD = "dead"
    RETRY = "retry"


@dataclass
class Result:
    item: Item
    verdict: Verdict
    answer: Answer
    reason: str = ""  # for DEAD: why, in words
    conflict: dict[str, Any] | None = None  # for a DEAD 409: what differs, by digest
    #: after a lone POST that may have been stored (maybe_stored), the LRS, asked by id,
    #: answered that it does not hold the statement (HTTP 200 without it, or 404)
    absent: bool = False


def fingerprint(statement: dict[str, Any]) -> str:
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _string_id(statement: dict[str, Any]) -> str | None:
    value = statement.get("id")
    return value if isinstance(value, str) else None


def merge_duplicates(items: Sequence[Item]) -> list[Item]:
    """Fold items whose statement (id and content) is identical into one leader item, so a
    batch never carries the same statement twice (the LRS would reject it as a whole)."""
    # Identical statements share their id: only items whose id occurs twice (or that have
    # no string id) need the canonical dump, which costs more than the rest of a batch's
    # bookkeeping in the pool process.
    ids = Counter(_string_id(item.statement) for item in items)
    leaders: dict[tuple[str, str], Item] = {}
    out: list[Item] = []
    for item in items:
        statement_id = _string_id(item.statement)
        if statement_id is not None and ids[statement_id] == 1:
            key = ("id", statement_id)
        else:
            key = ("content", fingerprint(item.statement))
        leader = leaders.get(key)
        if leader is None:
            leaders[key] = item
            out.append(item)
        else:
            leader.followers.append(item)
            leader.attempt = max(leader.attempt, item.attempt)
            leader.first_seen = min(leader.first_seen, item.first_seen)
            leader.lone_failures = max(leader.lone_failures, item.lone_failures)
    return out


# Properties an LRS sets or may rewrite on storage; xAPI 1.0.3 (Data, "Statement Comparison
# Requirements") leaves them out when it compares two statements.
LRS_SET_PROPERTIES = frozenset({"authority", "stored", "timestamp", "version"})


def same_id(stored: object, sent: str) -> bool:
    """True when ``stored`` (an id the LRS gave back) names the statement id ``sent``: two
    UUIDs compared as UUIDs (an LRS stores and returns them in lower case, a browser may
    send upper case: Ralph does), anything else as it is."""
    if not isinstance(stored, str):
        return False
    if stored == sent:
        return True
    return stored.lower() == sent.lower() and _is_uuid(sent)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _id_key(value: object) -> object:
    return value.lower() if isinstance(value, str) and _is_uuid(value) else value


def comparable(statement: dict[str, Any]) -> dict[str, Any]:
    """What two statements are compared on: not what an LRS sets, nor the case of an id."""
    out = {k: v for k, v in statement.items() if k not in LRS_SET_PROPERTIES}
    if "id" in out:
        out["id"] = _id_key(out["id"])
    return out


def digest(statement: dict[str, Any]) -> str:
    text = fingerprint(comparable(statement))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


#: fetch(statement id) -> (the LRS's answer, the statement it holds under that id, or None)
Fetch = Callable[[str], "tuple[Answer, dict[str, Any] | None]"]


def _settle_conflict(item: Item, answer: Answer, fetch: Fetch | None) -> Result:
    """A 409 for one statement: "the LRS holds a statement with this id". The same content
    is ours, stored by an earlier attempt (some LRSs answer an identical re-send with 409);
    a different content is a real conflict, dead-lettered with both digests. When the stored
    one cannot be read, nothing is decided: retried."""
    if fetch is None:
        return Result(item, Verdict.RETRY, answer)
    read, stored = fetch(item.statement_id)
    if stored is None:
        what = read.what if read.status != 200 else "no statement under that id"
        return Result(
            item,
            Verdict.RETRY,
            replace(answer, unverified=f"HTTP 409, and reading the stored one gave {what}"),
        )
    return _compared(item, answer, stored)


def _compared(item: Item, answer: Answer, stored: dict[str, Any]) -> Result:
    """The statement the LRS holds under ``item``'s id against ``item``'s: the same content
    is ours, delivered earlier; a different one is a conflict, dead-lettered."""
    if comparable(stored) == comparable(item.statement):
        return Result(item, Verdict.DUPLICATE, answer)
    conflict = {
        "id": item.statement_id,
        "sent_sha256": digest(item.statement),
        "stored_sha256": digest(stored),
        "stored_at": stored.get("stored"),
    }
    reason = f"conflict: the LRS holds a different statement with id {item.statement_id}"
    return Result(item, Verdict.DEAD, answer, reason=reason, conflict=conflict)


def _splittable(answer: Answer) -> bool:
    """A failure one statement can cause: an HTTP 5xx (a bulk insert failing as a whole) or
    a request sent and not answered in time. Not a refused connection or a bad address."""
    if answer.unverified:
        return False
    if answer.status is None:
        return answer.timed_out
    return answer.status >= 500


def maybe_stored(answer: Answer) -> bool:
    """A POST whose statements the LRS may have stored all the same: sent and not answered
    in time, or a gateway's 504 (its upstream did not answer in time). Such a statement is
    read back (GET by id) before it is sent again, and the failure is no evidence against
    it."""
    return not answer.unverified and (answer.timed_out or answer.status == 504)


def unsendable(
    items: Sequence[Item], max_bytes: int = MAX_STATEMENT_BYTES
) -> tuple[list[Item], list[Result]]:
    """The items whose statement can travel as JSON in UTF-8, and a dead-letter Result for
    each other one (a lone surrogate, NaN, nesting too deep, too large: content.py). One
    check per statement (its size is its own), about the cost of one of the whole batch."""
    sendable: list[Item] = []
    dead: list[Result] = []
    for item in items:
        why = problem(item.statement, max_bytes)
        if why is None:
            sendable.append(item)
        else:
            dead.append(Result(item, Verdict.DEAD, Answer(status=None, error=why), reason=why))
    return sendable, dead


#: A statement is dead-lettered as the LRS's poison once it has failed alone in this many
#: separate exchanges in each of which the LRS stored other statements. Failing alone is two
#: answers against it: HTTP 5xx twice in a row, or a timeout (or a gateway's 504, after
#: which it may be stored) and then the LRS, asked by id, answering that it does not hold
#: it. A flaky LRS failing each request alike with odds p (a balancer with one broken
#: backend, random 502s, a hanging backend) fails a valid statement so with odds p² or
#: p·(1-p), at most about 1 in 4 per exchange at p = 1/2: 1 in 10^6 for ten.
POISON_AFTER = 10


@dataclass
class _Walk:
    delivered: int = 0
    posts: int = 0
    #: lone failures of this exchange, and whether each was sent alone a second time (one
    #: whose last answer was a timeout or a 504 counts nothing against it: maybe_stored)
    lone_failures: list[tuple[Result, bool]] = field(default_factory=list)
    halted: Answer | None = None


def deliver(
    items: Sequence[Item],
    send: Callable[[list[dict[str, Any]]], Answer],
    on_sent: Callable[[int, Answer], None] | None = None,
    *,
    fetch: Fetch | None = None,
    isolate_after: int = 3,
    poison_after: int = POISON_AFTER,
    stored_before: bool | Callable[[], bool] = False,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_statement_bytes: int = MAX_STATEMENT_BYTES,
) -> list[Result]:
    """POST ``items`` as one batch and settle each statement.

    - A rejected batch (4xx about statements) is split in halves until each bad statement is
      alone, then dead-lettered; a lone 409 is compared with what the LRS holds.
    - A batch holding a statement already tried ``isolate_after`` times that fails with a
      5xx or a timeout is split the same way, so one poison statement does not hold its
      batch-mates. A 5xx or a timeout is no evidence against a statement by itself (a
      balancer with one broken backend, an LRS restarting): a statement that fails alone
      with a 5xx is sent alone once more; failing again while the LRS stores others, in
      this exchange or just before it (``stored_before``: the caller saw it store some
      recently; a callable is asked only when a statement fails alone),
      counts one lone failure (``Item.lone_failures``, carried from one exchange to the
      next), and only ``poison_after`` of them make it a dead letter. Three lone failures
      with nothing stored mean the LRS itself is failing: the walk stops.
    - A lone POST that timed out (or a gateway's 504, :func:`maybe_stored`) may have been
      stored: the statement is read back by id (``fetch``), and is delivered when the LRS
      holds it (dead-lettered as a conflict when it holds another statement under that id);
      else it is retried later (not sent again at once, which could race the first write
      on an LRS that checks ids then writes). A timeout alone is never evidence against a
      statement: only when the LRS then answers that it does not hold it (HTTP 200 without
      it, or 404) and stores others does it count one lone failure, as a 5xx twice does.
    - Any other failure (auth, config, connection) stops the walk: every statement not yet
      settled gets that answer with Verdict.RETRY.
    - A statement that cannot be sent as JSON in UTF-8 (:func:`unsendable`) is dead-lettered
      without a POST.
    - No POST starts after ``deadline`` (``clock()`` time): a split of many statements, or
      of slow answers, stops there and what is not settled is retried, so the batch's
      messages are settled before the broker's visibility timeout hands them to another.
    """
    items, results = unsendable(items, max_statement_bytes)
    walk = _Walk()
    asked: list[bool] = []

    def storing() -> bool:
        """The LRS stores others: in this exchange, or just before it."""
        if walk.delivered:
            return True
        if not asked:
            asked.append(stored_before() if callable(stored_before) else stored_before)
        return asked[0]

    def post(batch: Sequence[Item]) -> Answer:
        walk.posts += 1
        answer = verified(send([i.statement for i in batch]), [i.statement_id for i in batch])
        if on_sent is not None:
            on_sent(len(batch), answer)
        if answer.kind is Kind.OK:
            walk.delivered += len(batch)
        return answer

    def settle_rejected(item: Item, answer: Answer) -> Result:
        if answer.status == 409:
            return _settle_conflict(item, answer, fetch)
        return Result(item, Verdict.DEAD, answer, reason=f"rejected by the LRS ({answer.what})")

    def look_up(lone: Result) -> bool:
        """After a lone POST that may have been stored: read the statement back by id;
        True when the LRS holds it (delivered, or a conflict), False when not known."""
        if fetch is None:
            return False
        read, stored = fetch(lone.item.statement_id)
        if stored is None:
            lone.absent = read.status in (200, 404)
            return False
        settled = _compared(lone.item, lone.answer, stored)
        lone.verdict, lone.reason, lone.conflict = settled.verdict, settled.reason, settled.conflict
        if settled.verdict is Verdict.DUPLICATE:
            walk.delivered += 1  # the LRS stores (this one): evidence for the others' count
        return True

    def second_look(lone: Result) -> bool:
        """Send a statement that failed alone with a 5xx alone once more; True when this
        settled it (or stopped the walk), False when it failed the same way again."""
        answer = post([lone.item])
        kind = answer.kind
        if kind is Kind.OK:
            lone.verdict, lone.answer = Verdict.DELIVERED, answer
        elif maybe_stored(answer):
            lone.answer = answer
            return look_up(lone)
        elif kind is Kind.REJECTED:
            settled = settle_rejected(lone.item, answer)
            lone.verdict, lone.answer = settled.verdict, settled.answer
            lone.reason, lone.conflict = settled.reason, settled.conflict
        elif _splittable(answer):
            lone.answer = answer
            return False
        else:
            lone.answer = walk.halted = answer
        return True

    def visit(batch: Sequence[Item], splitting: bool) -> None:
        if walk.halted is None and walk.posts and deadline is not None and clock() >= deadline:
            walk.halted = Answer(
                status=None, error="split stopped: its time is up (visibility timeout)"
            )
        if walk.halted is not None:
            results.extend(Result(i, Verdict.RETRY, walk.halted) for i in batch)
            return
        answer = post(batch)
        kind = answer.kind
        if kind is Kind.OK:
            results.extend(Result(i, Verdict.DELIVERED, answer) for i in batch)
        elif kind is Kind.REJECTED and len(batch) > 1:
            middle = len(batch) // 2
            visit(batch[:middle], splitting)
            visit(batch[middle:], splitting)
        elif kind is Kind.REJECTED:
            results.append(settle_rejected(batch[0], answer))
        elif _splittable(answer) and (splitting or any(i.attempt >= isolate_after for i in batch)):
            if len(batch) > 1:
                middle = len(batch) // 2
                visit(batch[:middle], True)
                visit(batch[middle:], True)
                return
            lone = Result(batch[0], Verdict.RETRY, answer)
            results.append(lone)
            looked = False
            if maybe_stored(answer):
                if look_up(lone):
                    return
                looked = True  # not sent again at once: it may be being stored
            elif answer.status is not None and storing():
                if second_look(lone):
                    return
                looked = True
            walk.lone_failures.append((lone, looked))
            if walk.delivered == 0 and len(walk.lone_failures) >= 3:
                walk.halted = answer
        else:
            walk.halted = answer
            results.extend(Result(i, Verdict.RETRY, answer) for i in batch)

    if items:
        visit(list(items), False)
    if walk.lone_failures and storing():
        # The LRS stores others, in this very exchange or just before it: a statement that
        # failed alone (a 5xx twice in a row) counts one lone failure; enough of them, in as
        # many exchanges, make it the culprit.
        for lone, looked in walk.lone_failures:
            if walk.halted is not None or lone.verdict is not Verdict.RETRY:
                continue
            if not maybe_stored(lone.answer):
                if not looked and deadline is not None and clock() >= deadline:
                    continue  # no time for a second look: kept, not counted
                if not looked and lone.answer.status is not None and second_look(lone):
                    continue
            if maybe_stored(lone.answer) and not lone.absent:
                continue  # no evidence against it: it may even be stored
            lone.item.lone_failures += 1
            if lone.item.lone_failures >= poison_after:
                lone.verdict = Verdict.DEAD
                how = (
                    "and, asked by id, does not hold it"
                    if maybe_stored(lone.answer)
                    else "while it stores others"
                )
                lone.reason = (
                    f"the LRS fails on this statement alone ({lone.answer.what}) {how}, "
                    f"in {lone.item.lone_failures} separate exchanges in which it stores "
                    f"others ({lone.item.attempt} attempts)"
                )
    return results


def parse_retry_after(value: str | None, now: float, maximum: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header (delta-seconds or HTTP-date),
    at most ``maximum`` (``XAPI_WORKER_RETRY_AFTER_MAX_SECONDS``: an LRS's or a proxy's date
    far ahead, a typo, a clock gone wrong would otherwise hold every POST for as long; a date
    in 2028 held them 389 days)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), maximum)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # noqa: UP017 (Python 3.9 on Debian 11)
    return min(max(0.0, when.timestamp() - now), maximum)


def retry_delay(
    attempt: int,
    base: float,
    maximum: float,
    retry_after: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Delay before attempt ``attempt + 1``: exponential backoff (base * 2^(attempt-1)) with
    jitter in [50 %, 100 %], at least ``Retry-After``, never more than ``maximum``."""
    exponent = min(max(attempt - 1, 0), 32)
    ceiling = min(maximum, base * (2**exponent))
    delay = ceiling * (0.5 + 0.5 * rng())
    if retry_after is not None:
        delay = max(delay, retry_after)
    return float(round(min(delay, maximum), 3))


#: 2100-01-01T00:00:00Z: no header time is later than this.
LATEST_TIMESTAMP = 4_102_444_800.0


def iso(ts: float) -> str:
    when = datetime.fromtimestamp(ts, tz=timezone.utc)  # noqa: UP017
    return when.isoformat(timespec="milliseconds")


def parse_iso(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # noqa: UP017 (Python 3.9 on Debian 11)
    ts = when.timestamp()
    # A header can say anything: a time iso() cannot write back (year 0, year 10000) would
    # make every later dead-letter or re-publish of the message fail.
    return ts if LATEST_TIMESTAMP > ts > 0 else None
