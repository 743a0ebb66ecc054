"""Celery's task consumer, with no message acknowledged into nothing.

Celery acknowledges a message whose body it cannot decode (``on_decode_error``: a statement
nested deeper than the JSON parser goes from where the consumer calls it, about 940 levels
and more; a body that is not JSON or not base64) and drops, by a rejection without requeue,
a message that is not a task, names another task or a content type it does not accept:
gone, with a log line. Any producer of the queue can send such a message (Pod's view queues
whatever JSON a browser gives it). Here each of them becomes a dead letter with its reason
and the head of the message's body as text (``{"message_body": ..., "message_bytes": n,
"message_sha256": ...}``: at most ``BODY_HEAD`` characters, whatever the producer sent),
where ``xapi-worker dead-letters list`` shows it and the retention applies; the message is
acknowledged only once that is written (put back otherwise), and the other messages keep
flowing.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from .deadletters import DeadLetter
from .names import QUEUE, unreadable_key
from .settings import TASK_NAME

log = logging.getLogger("xapi_worker")

#: The dead letter of a message whose body is nested deeper than the consumer can parse.
NESTED_TOO_DEEP = "not decodable: nested too deep for the worker's JSON parser"
#: The key of the message's body in such a dead letter's ``statement``.
BODY = "message_body"
#: Its length in bytes and its SHA-256 (hex), beside it.
BODY_BYTES = "message_bytes"
BODY_SHA256 = "message_sha256"
#: Most characters of a message's body kept in its dead letter.
BODY_HEAD = 4096
#: The start of the dead letter's reason of a message that is no Celery protocol 2 task.
NOT_PROTOCOL_2 = "not a Celery protocol 2 task message"
#: Most characters of a producer-chosen value (task id, task name) in a dead letter or a log.
FIELD_MAX = 200


def _cause(exc: BaseException) -> BaseException:
    """The error under kombu's DecodeError (which wraps what the decoder raised)."""
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
    return inner or exc.__cause__ or exc.__context__ or exc


def decode_reason(exc: BaseException) -> str:
    cause = _cause(exc)
    if isinstance(cause, RecursionError):
        return NESTED_TOO_DEEP
    return f"not decodable: {type(cause).__name__}: {str(cause)[:200]}"


def body_summary(message: Any) -> dict[str, Any]:  # noqa: ANN401 (kombu's Message)
    """The head of ``message``'s body as text, its length and its digest: a dead letter
    never grows with what a producer sent."""
    body = getattr(message, "body", b"")
    data = bytes(body) if isinstance(body, (bytes, bytearray)) else str(body).encode()
    return {
        BODY: data[: BODY_HEAD * 4].decode("utf-8", "replace")[:BODY_HEAD],
        BODY_BYTES: len(data),
        BODY_SHA256: hashlib.sha256(data).hexdigest(),
    }


def not_protocol_2(message: Any) -> str | None:  # noqa: ANN401 (kombu's Message)
    """Why ``message``, a task message, is not one of Celery's protocol 2 (a ``task`` header,
    a body that decodes to ``[args, kwargs, embed]``), or None. Pod only sends those; Celery
    and celery-batches also run protocol 1 (the task, its ``eta`` and ``expires`` in a body
    that is a dict, no ``task`` header) and a "hybrid" body (a dict holding ``args``) and
    take ``eta`` from the body: a producer's far ``eta`` there held the batch's prefetch
    slots (nothing else was delivered), and one Celery could not convert was rejected into
    nothing. A message that is no task at all is left to Celery's path (dead-lettered with
    its own reason); a body that cannot be decoded raises (Celery's path, too). Decoding
    here costs nothing more: kombu keeps the decoded body for Celery."""
    headers = message.headers
    if not isinstance(headers, dict):
        return None
    if "task" not in headers:
        body = message.payload
        if isinstance(body, dict) and "task" in body:
            return "protocol 1 (the task named in the body, no task header)"
        return None
    body = message.payload
    if isinstance(body, dict):
        return "protocol 1 or hybrid (the body is a dict)"
    if (
        not isinstance(body, (list, tuple))
        or len(body) != 3
        or not isinstance(body[0], (list, tuple))
        or not isinstance(body[1], dict)
        or not (body[2] is None or isinstance(body[2], dict))
    ):
        return "the body is not [args, kwargs, embed]"
    return None


def bounded(value: object) -> str:
    """A producer-chosen value as text, cut to ``FIELD_MAX`` characters."""
    return str(value)[:FIELD_MAX]


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """``worker_consumer`` of the worker's app (worker.make_celery)."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        """Celery's handler, and a message it fails on (a body that decodes to something
        else than ``[args, kwargs, embed]``, a header of the wrong type) set aside: raised
        out of the event loop, it stayed unacknowledged and came back, again and again."""
        handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> None:  # noqa: ANN401
            try:
                why = not_protocol_2(message)
            except Exception:  # not decodable: Celery's path says why (below)
                why = None
            if why is not None:
                self.set_aside(message, f"{NOT_PROTOCOL_2}: {why}")
                return
            try:
                handler(message)
            except Exception as exc:
                if message.acknowledged:
                    raise
                log.debug("message cannot be read as a task", exc_info=True)
                self.set_aside(message, f"invalid task message: {type(exc).__name__}")

        return on_task_received

    def on_decode_error(self, message: Any, exc: BaseException) -> None:  # noqa: ANN401
        self.set_aside(message, decode_reason(exc))

    def on_unknown_message(self, body: object, message: Any) -> None:  # noqa: ANN401
        self.set_aside(message, "not a task message (no task name in its headers or body)")

    def on_unknown_task(self, body: object, message: Any, exc: BaseException) -> None:  # noqa: ANN401
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = bounded(headers.get("task", "?"))
        self.set_aside(message, f"not this worker's task: {name!r} (it runs {TASK_NAME})")

    def on_invalid_task(self, body: object, message: Any, exc: BaseException) -> None:  # noqa: ANN401
        self.set_aside(message, f"invalid task message: {type(exc).__name__}: {str(exc)[:200]}")

    def set_aside(self, message: Any, reason: str) -> None:  # noqa: ANN401
        """Dead-letter ``message`` with ``reason``, then acknowledge it; put it back when the
        dead letter cannot be written (the broker refuses: it comes again)."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        raw_id = headers.get("id")
        task_id = bounded(raw_id) if isinstance(raw_id, str) else ""
        task = self.app.tasks.get(TASK_NAME)
        processor = getattr(task, "processor", None)
        letter = DeadLetter(
            statement=body_summary(message),
            reason=reason,
            task_id=task_id,
        )
        if processor is None or not processor.write_dead_letter(letter):
            self._unreadable(message, task_id, reason)
            return
        processor.metrics.flush()
        log.error("dead letter: message %r cannot be read: %s", task_id, reason)
        message.ack()

    def _unreadable(self, message: Any, task_id: str, reason: str) -> None:  # noqa: ANN401
        """A message that could not be dead-lettered goes to ``xapi.unreadable`` (put back at
        the head of the queue, it came again at once: a hot loop, a traceback each turn).
        Should that move fail too (the broker gone), it stays unacknowledged: the channel's
        close or the visibility timeout puts it back, once."""
        set_aside = getattr(message.channel, "set_aside", None)
        try:
            if set_aside is None:
                raise RuntimeError("not the worker's transport")
            set_aside(message.delivery_tag, QUEUE)
        except Exception:
            log.exception(
                "message %r cannot be read (%s) nor set aside: left unacked", task_id, reason
            )
            return
        log.error(
            "message %r cannot be read (%s) nor dead-lettered: moved to %s",
            task_id,
            reason,
            unreadable_key(QUEUE),
        )
        message.ack()
