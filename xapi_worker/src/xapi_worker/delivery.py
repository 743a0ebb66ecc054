"""Pure delivery logic: statement ids, HTTP answer classification, bisection of rejected
batches, retry delays. No I/O here: the HTTP exchange is a callable given by the caller."""

from __future__ import annotations

import enum
import json
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

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
    OK = "ok"  # 2xx: accepted (200 with ids, or 204 when every id was already stored)
    REJECTED = "rejected"  # 400/409/413/422 and other 4xx: split the batch, then dead letter
    AUTH = "auth"  # 401/403: credentials; retried, never dropped
    CONFIG = "config"  # 404/405/3xx: wrong XAPI_LRS_URL; retried, never dropped
    TRANSIENT = "transient"  # network error, timeout, 408, 429, 5xx: retried with backoff


def classify(status: int | None) -> Kind:
    """Map an HTTP status (``None`` = no answer: connection error or timeout) to a Kind."""
    if status is None:
        return Kind.TRANSIENT
    if 200 <= status < 300:
        return Kind.OK
    if status in (401, 403):
        return Kind.AUTH
    if status in (404, 405) or 300 <= status < 400:
        return Kind.CONFIG
    if status in (408, 429) or status >= 500:
        return Kind.TRANSIENT
    return Kind.REJECTED


@dataclass
class Answer:
    """What one HTTP exchange with the LRS gave."""

    status: int | None
    excerpt: str = ""
    retry_after: float | None = None
    latency_ms: float = 0.0
    error: str = ""  # exception class and message when there was no HTTP answer

    @property
    def kind(self) -> Kind:
        return classify(self.status)


@dataclass
class Item:
    """One statement in a batch, with what is known about its earlier attempts."""

    key: str  # opaque handle for the caller (the Celery task id)
    statement: dict[str, Any]
    attempt: int = 1
    first_seen: float = 0.0  # epoch seconds
    maybe_sent_before: bool = False  # earlier attempt or broker redelivery
    followers: list[Item] = field(default_factory=list)  # same id and content, same batch


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    DUPLICATE = "duplicate"  # 409 for an id this worker may have stored itself earlier
    DEAD = "dead"
    RETRY = "retry"


@dataclass
class Result:
    item: Item
    verdict: Verdict
    answer: Answer


def merge_duplicates(items: Sequence[Item]) -> list[Item]:
    """Fold items whose statement (id and content) is identical into one leader item, so a
    batch never carries the same statement twice (the LRS would reject it as a whole)."""
    leaders: dict[str, Item] = {}
    out: list[Item] = []
    for item in items:
        fingerprint = json.dumps(item.statement, sort_keys=True, separators=(",", ":"))
        leader = leaders.get(fingerprint)
        if leader is None:
            leaders[fingerprint] = item
            out.append(item)
        else:
            leader.followers.append(item)
            leader.maybe_sent_before = leader.maybe_sent_before or item.maybe_sent_before
            leader.attempt = max(leader.attempt, item.attempt)
    return out


def deliver(
    items: Sequence[Item],
    send: Callable[[list[dict[str, Any]]], Answer],
    on_sent: Callable[[int, Answer], None] | None = None,
) -> list[Result]:
    """POST ``items`` as one batch; split a rejected batch in halves until each bad statement
    is alone. Once the LRS gives a non-rejection failure (auth, config, transient), nothing
    more is sent: every statement not yet settled gets that answer with Verdict.RETRY."""
    results: list[Result] = []
    halted: list[Answer] = []

    def visit(batch: Sequence[Item]) -> None:
        if halted:
            results.extend(Result(i, Verdict.RETRY, halted[0]) for i in batch)
            return
        answer = send([i.statement for i in batch])
        if on_sent is not None:
            on_sent(len(batch), answer)
        kind = answer.kind
        if kind is Kind.OK:
            results.extend(Result(i, Verdict.DELIVERED, answer) for i in batch)
        elif kind is Kind.REJECTED:
            if len(batch) > 1:
                middle = len(batch) // 2
                visit(batch[:middle])
                visit(batch[middle:])
            elif answer.status == 409 and batch[0].maybe_sent_before:
                results.append(Result(batch[0], Verdict.DUPLICATE, answer))
            else:
                results.append(Result(batch[0], Verdict.DEAD, answer))
        else:
            halted.append(answer)
            results.extend(Result(i, Verdict.RETRY, answer) for i in batch)

    if items:
        visit(list(items))
    return results


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # noqa: UP017 (Python 3.9 on Debian 11)
    return max(0.0, when.timestamp() - now)


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
    return when.timestamp()
