"""Statement content the worker cannot send, and JSON text that any content can be written as.

Statements come from anonymous browsers (Pod's view queues whatever JSON it is given): a
string cut inside an emoji holds a lone UTF-16 surrogate escape (``"\\ud83c"``), which JSON
allows and UTF-8 cannot encode; Python's JSON reader takes ``NaN`` and ``Infinity``, which
are not JSON; and a value can be nested as deep as the producer's parser allows, deeper than
the worker can re-encode. None of these can reach an LRS as a JSON text in UTF-8 (I-JSON,
RFC 7493 §2.1, forbids the first; RFC 8259 §6 the second), so such a statement is
dead-lettered alone, with :func:`problem` as its reason, without a POST.

Every write of a statement (the POST, the spool, a dead letter, a CLI listing) goes through
:func:`json_text` or the same rule, which never raises on content: text UTF-8 cannot encode
travels as ``\\uXXXX`` escapes, and a value nested too deep is cut at :data:`KEEP_DEPTH`
levels (its deeper parts replaced by a marker), so the dead letter of any statement can be
written.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Levels of nesting kept free for the encoding of a statement that passed :func:`problem`.
DEPTH_MARGIN = 48
#: A dead letter keeps this many levels of a statement too deep to encode whole.
KEEP_DEPTH = 64
#: What replaces the parts of a statement cut at :data:`KEEP_DEPTH` levels.
CUT_MARKER = "<cut: nested deeper than 64 levels>"

LONE_SURROGATE = (
    "not encodable as UTF-8: a string holds a lone UTF-16 surrogate (JSON escape \\ud800-"
    "\\udfff without its pair), which no LRS can store"
)
NOT_A_NUMBER = "not valid JSON: a number is NaN or infinite"
TOO_DEEP = "not encodable: nested too deep"
#: The largest statement the worker takes by default (``XAPI_WORKER_MAX_STATEMENT_KB``): its
#: JSON text, in UTF-8. Pod's statements are 1 to 3 kB (a long session's played-segments, a
#: few more); a browser can send anything. Larger, it is dead-lettered alone without a POST.
#: This bounds what one batch can write to the spool (spool.batch_bytes), the spool's
#: headroom.
MAX_STATEMENT_BYTES = 256 * 1024


def too_large(max_bytes: int = MAX_STATEMENT_BYTES) -> str:
    """The reason of a statement larger than ``max_bytes``."""
    return f"too large: its JSON text is longer than {max_bytes} bytes in UTF-8"


TOO_LARGE = too_large()


def problem(value: Any, max_bytes: int = MAX_STATEMENT_BYTES) -> str | None:  # noqa: ANN401
    """Why ``value`` (any JSON value) cannot be sent as a JSON text in UTF-8, or is larger
    than the worker takes (``max_bytes``) (None: it can). Checked
    :data:`DEPTH_MARGIN` levels deeper than the value is: the POST encodes it from deeper in
    the call stack, where Python's recursion limit comes sooner."""
    for _ in range(DEPTH_MARGIN):
        value = [value]
    try:
        size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except UnicodeEncodeError:
        return LONE_SURROGATE
    except RecursionError:
        return TOO_DEEP
    except (TypeError, ValueError):
        return NOT_A_NUMBER
    if size - 2 * DEPTH_MARGIN > max_bytes:
        return too_large(max_bytes)
    return None


#: The key that marks a dead letter's ``statement`` as the summary of a statement too large
#: to keep whole (:func:`bounded`); ``dead-letters replay`` skips such a letter (no
#: statement to send). Its value says why.
STATEMENT_CUT = "statement_cut"
#: The summary's other keys besides ``id``, ``actor``, ``verb`` and ``object``: the length
#: of the statement's JSON text in UTF-8, its SHA-256 (hex), and the start of that text.
STATEMENT_BYTES = "statement_bytes"
STATEMENT_SHA256 = "statement_sha256"
STATEMENT_HEAD = "statement_head"
#: Most bytes (UTF-8) of the statement's text kept in its summary.
SUMMARY_HEAD_BYTES = 4096
#: Most characters of an id (the statement's, its verb's, its object's) kept in a summary.
SUMMARY_ID_CHARS = 256
#: Most bytes of the actor's JSON text kept in a summary (larger: its identifying fields
#: only, or none; ``forget`` then reads the head).
SUMMARY_ACTOR_BYTES = 1024
#: The identifying fields of an actor kept when the whole actor is too large.
_ACTOR_FIELDS = ("objectType", "name", "mbox", "mbox_sha1sum", "openid")


def _short(value: Any) -> str | None:  # noqa: ANN401
    return value[:SUMMARY_ID_CHARS] if isinstance(value, str) else None


def _small_actor(actor: Any) -> dict[str, Any] | None:  # noqa: ANN401
    """``actor`` when its JSON text fits :data:`SUMMARY_ACTOR_BYTES`; else its identifying
    fields that are short strings, when there are any and they fit; else None (a group's
    members are not kept: the head of the text holds the first of them)."""
    if not isinstance(actor, dict):
        return None
    if len(json_text(actor).encode("utf-8")) <= SUMMARY_ACTOR_BYTES:
        return actor
    short: dict[str, Any] = {
        k: v
        for k in _ACTOR_FIELDS
        if isinstance(v := actor.get(k), str) and len(v) <= SUMMARY_ID_CHARS
    }
    account = actor.get("account")
    if isinstance(account, dict):
        fields = {k: account.get(k) for k in ("homePage", "name")}
        if all(isinstance(v, str) and len(v) <= SUMMARY_ID_CHARS for v in fields.values()):
            short["account"] = fields
    if set(short) - {"objectType"} and len(json_text(short).encode("utf-8")) <= SUMMARY_ACTOR_BYTES:
        return short
    return None


def bounded(statement: dict[str, Any], max_bytes: int = MAX_STATEMENT_BYTES) -> dict[str, Any]:
    """``statement`` as its dead letter keeps it: whole when its JSON text is at most
    ``max_bytes`` in UTF-8; otherwise a summary marked :data:`STATEMENT_CUT` (its id, actor,
    verb id and object id when small, cut to a bound; its length, SHA-256 and the first
    :data:`SUMMARY_HEAD_BYTES` of its text), at most about 15 KiB whatever was sent: a dead
    letter never weighs more than a statement the worker takes (the dead letters' headroom,
    deadstore.py), so a flood of huge statements cannot fill them."""
    data = json_text(statement).encode("utf-8")
    if len(data) <= max_bytes:
        return statement
    summary: dict[str, Any] = {
        STATEMENT_CUT: f"longer than {max_bytes} bytes: only this summary is kept",
    }
    if (sid := _short(statement.get("id"))) is not None:
        summary["id"] = sid
    if (actor := _small_actor(statement.get("actor"))) is not None:
        summary["actor"] = actor
    for key in ("verb", "object"):
        part = statement.get(key)
        if isinstance(part, dict) and (pid := _short(part.get("id"))) is not None:
            summary[key] = {"id": pid}
    summary[STATEMENT_BYTES] = len(data)
    summary[STATEMENT_SHA256] = hashlib.sha256(data).hexdigest()
    summary[STATEMENT_HEAD] = data[:SUMMARY_HEAD_BYTES].decode("utf-8", "ignore")
    return summary


def _cut(value: Any, depth: int) -> Any:  # noqa: ANN401
    """A copy of ``value`` whose containers below ``depth`` levels are replaced by
    :data:`CUT_MARKER`; iterative, so any depth can be cut."""
    root: list[Any] = [None]
    # (source container, its copy, level of the copy)
    stack: list[tuple[Any, Any, int]] = []

    def copy(item: Any, level: int) -> Any:  # noqa: ANN401
        if isinstance(item, (dict, list)):
            if level >= depth:
                return CUT_MARKER
            new: Any = {} if isinstance(item, dict) else []
            stack.append((item, new, level + 1))
            return new
        return item

    root[0] = copy(value, 0)
    while stack:
        source, target, level = stack.pop()
        if isinstance(source, dict):
            for key, item in source.items():
                target[str(key)] = copy(item, level)
        else:
            target.extend(copy(item, level) for item in source)
    return root[0]


def json_text(value: Any, *, sort_keys: bool = False, compact: bool = True) -> str:  # noqa: ANN401
    """``value`` as JSON text (``compact``: without spaces) that UTF-8 can always encode;
    never raises on content. Plain UTF-8 when it can be (the common case); ``\\uXXXX``
    escapes for what UTF-8 cannot encode; a value too deep to encode is cut at
    :data:`KEEP_DEPTH` levels."""
    separators = (",", ":") if compact else (", ", ": ")
    options: dict[str, Any] = {"separators": separators, "sort_keys": sort_keys}
    try:
        text = json.dumps(value, ensure_ascii=False, **options)
    except RecursionError:
        return json.dumps(_cut(value, KEEP_DEPTH), ensure_ascii=True, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **options)
    return text


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode escaped (``\\udXXX``), for logs and columns."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
