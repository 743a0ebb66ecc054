"""The worker's own bookkeeping of a message (attempt, first seen, lone failures), carried in
message headers, and why only the workers can write it.

Any client of the broker that may publish to the queue can set any header: Pod's frontal
publishes with the producer's ACL user (roles/xapi_broker), whose credentials are the exposed
host's. A message arriving with ``xapi_lone_failures=9`` or an old ``xapi_first_seen`` must
not be dead-lettered on its first failure or as too old. So the headers count only when they
carry ``xapi_mac``, an HMAC-SHA256 of the task id, the three values, the message's ``eta``
and the SHA-256 of its body (so a signed header set cannot be put on another message, nor
given another ``eta``: a far one held a batch's prefetch slots), keyed by a secret
derived from what the workers alone hold: the LRS password and the workers' broker password
(the frontal has neither: roles/xapi_frontal, roles/xapi_broker). The workers sign every message
they re-publish; a message whose headers are unsigned or do not match is a new message:
attempt 1, no lone failure, first seen when a worker first took it (stamped by the transport,
and signed then, so that a redelivery after a crash keeps that time).

Changing either password changes the key: messages signed before count as new ones (their
maximum age counts again from their next take). So do messages signed by a release before
the ``eta`` and the body were signed (v2): in flight during an upgrade (retries waiting in
the queue, with the spool off), each is taken as a new message, its ``eta`` dropped
(delivered at once), its attempt and lone failures counted again from zero; none is lost.
Stdlib only: the transport, the pool processes and the tests import it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .names import ATTEMPT, BODY_SHA256, ETA, FIRST_SEEN, LONE_FAILURES, MAC, TAKEN_AT

#: the headers a batch reads of a request (worker._slim)
OURS = (ATTEMPT, FIRST_SEEN, LONE_FAILURES, MAC, TAKEN_AT, ETA, BODY_SHA256)

#: The largest count a header may carry (SQLite's INTEGER holds 64 bits).
COUNT_MAX = 1_000_000
#: PBKDF2 rounds of the key: a MAC seen by a reader of the queue (the monitoring user reads
#: the oldest message) is no cheap test of a guessed password. Computed once per process.
_ROUNDS = 100_000
_SALT = b"xapi-worker bookkeeping headers v1"
#: The first bytes of the signed text (a message signed by an older worker counts as new).
_VERSION = b"xapi-worker bookkeeping v3\0"


def derive_key(lrs_password: str, broker_url: str) -> bytes:
    """The signing key: from the LRS password and the password of the workers' broker URL."""
    try:
        broker_password = unquote(urlsplit(broker_url).password or "")
    except ValueError:
        broker_password = ""
    secret = b"\0".join(s.encode("utf-8", "surrogatepass") for s in (lrs_password, broker_password))
    return hashlib.pbkdf2_hmac("sha256", secret, _SALT, _ROUNDS)


def body_digest(body: object) -> str:
    """The SHA-256 (hex) of a message's body as it travels (kombu's base64 text)."""
    data = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def _message(
    task_id: str,
    attempt: object,
    first_seen: object,
    lone_failures: object,
    eta: object,
    body_sha256: object,
) -> bytes:
    """The signed text: each value preceded by its length in bytes (joined by a separator,
    values that contain it could be read two ways: ``("t\n1", 2)`` and ``("t", "1\n2")``).
    The ``eta`` (none: empty) and the body's digest are in it: a header set read from the
    queue cannot be put on another message, nor given another ``eta``."""
    out = bytearray(_VERSION)
    for value in (task_id, attempt, first_seen, lone_failures, eta or "", body_sha256):
        data = str(value).encode("utf-8", "surrogatepass")
        out += len(data).to_bytes(8, "big") + data
    return bytes(out)


def sign(
    key: bytes,
    task_id: str,
    attempt: object,
    first_seen: object,
    lone_failures: object,
    eta: object = None,
    body_sha256: object = "",
) -> str:
    text = _message(task_id, attempt, first_seen, lone_failures, eta, body_sha256)
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def unsigned_headers(attempt: int, first_seen: str, lone_failures: int) -> dict[str, object]:
    """The bookkeeping of a message a worker re-publishes, signed by the transport as it is
    queued (transport.Channel._put: the ``eta`` and the body are known only then)."""
    return {ATTEMPT: attempt, FIRST_SEEN: first_seen, LONE_FAILURES: lone_failures}


def signed_headers(
    key: bytes,
    task_id: str,
    attempt: int,
    first_seen: str,
    lone_failures: int,
    eta: object = None,
    body_sha256: str = "",
) -> dict[str, object]:
    """The headers of a message a worker publishes (or stamps at its first take)."""
    return {
        **unsigned_headers(attempt, first_seen, lone_failures),
        MAC: sign(key, task_id, attempt, first_seen, lone_failures, eta, body_sha256),
    }


def is_signed(key: bytes, task_id: object, headers: Mapping[str, object]) -> bool:
    """True when ``headers`` carry the values as a worker signed them for ``task_id``, with
    the ``eta`` they carry and the body whose digest the transport stamped at the take
    (:data:`BODY_SHA256`)."""
    mac = headers.get(MAC)
    if not isinstance(mac, str) or not isinstance(task_id, str):
        return False
    expected = sign(
        key,
        task_id,
        headers.get(ATTEMPT),
        headers.get(FIRST_SEEN),
        headers.get(LONE_FAILURES),
        headers.get(ETA),
        headers.get(BODY_SHA256, ""),
    )
    return hmac.compare_digest(mac, expected)


def count(value: object, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    try:
        return min(COUNT_MAX, max(minimum, int(str(value))))
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class Bookkeeping:
    """What a batch trusts of a message's headers."""

    attempt: int = 1
    first_seen: object = None  # the header's value (ISO 8601) when signed, else None
    lone_failures: int = 0


def trusted(key: bytes, task_id: object, headers: Mapping[str, object]) -> Bookkeeping:
    """The bookkeeping of a message: its headers when a worker signed them, else a new
    message's (attempt 1, no lone failure, first seen unknown: the caller's now)."""
    if not is_signed(key, task_id, headers):
        return Bookkeeping()
    return Bookkeeping(
        attempt=count(headers.get(ATTEMPT), 1),
        first_seen=headers.get(FIRST_SEEN),
        lone_failures=count(headers.get(LONE_FAILURES), 0, minimum=0),
    )


def taken_at(headers: Mapping[str, object]) -> float | None:
    """When the transport last took the message (epoch seconds), if it says."""
    value = headers.get(TAKEN_AT)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
