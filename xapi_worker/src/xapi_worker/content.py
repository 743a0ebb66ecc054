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
