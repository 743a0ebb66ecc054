"""xAPI statements for the tests and the benchmark: one builder, whose options give each
caller the statement it always sent (Pod's video player, a bare one, one the LRS refuses).

Standard library only, and no import of the rest of the package: the benchmark sends this
file's source to the lab hosts, where Pod's venv runs it to number thousands of statements
without shipping them over the command line (see source())."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path
from typing import Any

VIDEO = "https://w3id.org/xapi/video"
EXT = VIDEO + "/extensions/"
VIDEO_TYPE = VIDEO + "/activity-type/video"
# The verbs of Pod's video player (w3id video profile, some from ADL's vocabulary).
VERBS = {
    "initialized": "http://adlnet.gov/expapi/verbs/initialized",
    "played": VIDEO + "/verbs/played",
    "paused": VIDEO + "/verbs/paused",
    "seeked": VIDEO + "/verbs/seeked",
    "interacted": "http://adlnet.gov/expapi/verbs/interacted",
    "completed": "http://adlnet.gov/expapi/verbs/completed",
    "terminated": "http://adlnet.gov/expapi/verbs/terminated",
}


def now() -> str:
    """An xAPI timestamp of this instant (UTC, ISO 8601)."""
    return datetime.datetime.now(datetime.UTC).isoformat()


def agent(name: str | None, mbox: str, *, typed: bool = True) -> dict[str, Any]:
    """An actor identified by its mailbox; `typed` adds objectType "Agent"."""
    actor: dict[str, Any] = {"objectType": "Agent"} if typed else {}
    if name is not None:
        actor["name"] = name
    actor["mbox"] = mbox
    return actor


def statement(
    verb: str | None = "played",
    *,
    statement_id: str | None = None,
    with_id: bool = True,
    verb_id: str | None = None,
    actor: dict[str, Any] | None = None,
    object_id: str = "https://pod.example.org/video/0001-test/",
    object_name: dict[str, str] | None = None,
    object_type: str | None = VIDEO_TYPE,
    context: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """One statement. An option left at None leaves its field out (verb=None: no verb, which
    the LRS refuses); the id is a fresh UUID unless given, and absent with with_id=False (the
    worker must then let the LRS assign one). The verb's id is VERBS[verb] unless verb_id
    says otherwise; its display is the verb's name."""
    body: dict[str, Any] = {}
    if with_id:
        body["id"] = statement_id or str(uuid.uuid4())
    body["actor"] = actor if actor is not None else agent("anonymous", "mailto:a@example.org")
    if verb is not None:
        body["verb"] = {"id": verb_id or VERBS[verb], "display": {"en-US": verb}}
    activity: dict[str, Any] = {"objectType": "Activity", "id": object_id}
    definition: dict[str, Any] = {}
    if object_type is not None:
        definition["type"] = object_type
    if object_name is not None:
        definition["name"] = object_name
    if definition:
        activity["definition"] = definition
    body["object"] = activity
    for field, value in (("context", context), ("result", result), ("timestamp", timestamp)):
        if value is not None:
            body[field] = value
    return body


def video_context(session: str | None = None, length: float = 600.0) -> dict[str, Any]:
    """The context Pod's player gives: the video profile's category, and with a session the
    session-id and length extensions."""
    context: dict[str, Any] = {"contextActivities": {"category": [{"id": VIDEO}]}}
    if session is not None:
        context["extensions"] = {EXT + "session-id": session, EXT + "length": length}
    return context


def video_statement(
    verb: str, n: int = 0, with_id: bool = True, session: str | None = None
) -> dict[str, Any]:
    """Statement number n as Pod's video player sends it (a 600 s video, n's position in it),
    with the result extensions that go with each verb."""
    t = float(n % 600)
    result: dict[str, Any] | None = {"extensions": {EXT + "time": t}}
    if verb == "seeked":
        result = {"extensions": {EXT + "time-from": t, EXT + "time-to": t + 30.0}}
    elif verb in ("paused", "completed", "terminated"):
        result = {
            "extensions": {
                EXT + "time": t,
                EXT + "progress": 0.5,
                EXT + "played-segments": f"0[.]{t}",
            }
        }
    if verb in ("initialized", "interacted"):
        result = None
    elif verb == "completed":
        result = {**(result or {}), "completion": True}
    return statement(
        verb,
        with_id=with_id,
        actor=agent("anonymous", "mailto:a@example.org"),
        object_id=f"https://pod.example.org/video/{n:04d}-demo/",
        object_name={"fr": f"Vid\u00e9o {n}"},  # ASCII source: it is sent to the hosts
        context=video_context(session or str(uuid.uuid4()), 600.0),
        result=result,
        timestamp="2026-11-28T10:00:00.000Z",
    )


# The four ways a buggy caller breaks a rule every LRS enforces (kind modulo 4).
INVALID_KINDS = ("no verb", "no actor", "actor without identifier", "verb without id")


def invalid(body: dict[str, Any], kind: int) -> dict[str, Any]:
    """A copy of `body` the LRS must refuse, broken the way INVALID_KINDS[kind % 4] says."""
    broken = dict(body)
    which = kind % len(INVALID_KINDS)
    if which == 0:
        del broken["verb"]
    elif which == 1:
        del broken["actor"]
    elif which == 2:
        broken["actor"] = {"objectType": "Agent", "name": "no identifier"}
    else:
        broken["verb"] = {"display": dict(body["verb"]["display"])}
    return broken


def source() -> str:
    """This module's text, for code run on a lab host with no access to the package."""
    return Path(__file__).read_text(encoding="utf-8")
