"""`xapi-worker forget`: one learner's statements removed from every place the worker keeps
them (queue, in-flight lists, unacked, the spool, dead letters, xapi.unreadable), nobody
else's touched, against a real Redis, and while a real worker runs."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from support import VENV_BIN, Proxy, pod_producer, wait_for, worker_env
from xapi_testsupport.statements import agent, statement, video_statement
from xapi_worker.deadstore import DiskDeadLetters
from xapi_worker.forget import Learner, LearnerError, decode
from xapi_worker.spool import Entry, Spool, node_file

ALICE = agent("Alice Martin", "mailto:Alice.Martin@Example.org")
BOB = agent("Bob Durand", "mailto:bob.durand@example.org")
ALICE_ON_STDIN = json.dumps({"mbox": "alice.martin@example.org"})  # another case, no mailto:


def _of(actor: dict[str, Any], n: int) -> dict[str, Any]:
    body = video_statement("played", n)
    body["actor"] = actor
    return body


def _spool_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _forget(config: Path, who: str, *args: str) -> tuple[int, dict[str, Any], str]:
    out = subprocess.run(
        [str(VENV_BIN / "xapi-worker"), "forget", "--stdin", *args],
        env=worker_env(config),
        input=who,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(out.stdout) if out.stdout.strip() else {}
    return out.returncode, report, out.stderr


# --- who is the learner -----------------------------------------------------------------------
def test_a_learner_is_matched_in_any_agent_of_a_statement_and_nowhere_else():
    alice = Learner.of({"mbox": "mailto:ALICE.martin@example.org"})
    sha1 = hashlib.sha1(b"mailto:alice.martin@example.org", usedforsecurity=False).hexdigest()
    assert alice.matches(_of(ALICE, 1))
    assert alice.matches(_of({"mbox_sha1sum": sha1}, 2))
    # an agent as the object, an instructor, a group's member, a sub-statement's actor
    mentored = statement(actor=BOB)
    mentored["object"] = {"objectType": "Agent", "mbox": "mailto:alice.martin@example.org"}
    assert alice.matches(mentored)
    assert alice.matches(statement(actor=BOB, context={"instructor": ALICE}))
    group = {"objectType": "Group", "member": [BOB, ALICE]}
    assert alice.matches(statement(actor=group))
    sub = statement(actor=BOB)
    sub["object"] = {"objectType": "SubStatement", "actor": ALICE, "verb": sub["verb"]}
    assert alice.matches(sub)
    # the address as text elsewhere (a result, an activity's name) is not an agent
    other = statement(actor=BOB, object_name={"en": "alice.martin@example.org"})
    other["result"] = {"response": "mailto:alice.martin@example.org"}
    assert not alice.matches(other)
    assert not alice.matches(_of(BOB, 3))
    # an account, its home page with or without the slash; a name, in agents only
    account = Learner.of({"account": {"homePage": "https://pod.example.org/", "name": "amartin"}})
    assert account.matches(
        statement(actor={"account": {"homePage": "https://pod.example.org", "name": "amartin"}})
    )
    assert not account.matches(
        statement(actor={"account": {"homePage": "https://pod.example.org", "name": "bob"}})
    )
    named = Learner.of({"name": "Alice Martin"}, name_is_unique=True)
    assert named.matches(_of(ALICE, 4))
    assert not named.matches(statement(actor=BOB, object_name={"en": "Alice Martin"}))
    # any depth, no recursion
    deep: Any = _of(ALICE, 5)
    for _ in range(100_000):
        deep = [deep]
    assert alice.matches(deep)
    # never shown
    assert "alice" not in repr(alice).lower()


def test_a_learner_given_wrong_is_refused_naming_the_field_not_the_value():
    for bad, field in (
        ({}, "mbox"),
        ({"mbox": "no-address"}, "mbox"),
        ({"account": {"homePage": "https://x"}}, "account"),
        ({"name": "  "}, "name"),
        ({"email": "alice@example.org"}, "email"),
    ):
        try:
            Learner.of(bad)
        except LearnerError as exc:
            assert field in str(exc)
            assert "alice@example.org" not in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")


def test_a_name_with_an_mbox_or_an_account_is_not_used_and_alone_needs_the_operators_word():
    """forget by name erased every homonym's statements, and a name given with an mbox
    matched on either (review of the worker, L7). Then the name narrowed, and the learner's
    own statements under another name were missed while forget said complete (review of
    session 6, M1). With an mbox or an account the name is not used; a name alone is refused
    unless the operator says names are unique."""
    homonym = agent("Alice Martin", "mailto:alice.martin@other.example.org")
    renamed = agent("A. Martin", "mailto:alice.martin@example.org")
    both = Learner.of({"mbox": "alice.martin@example.org", "name": "Alice Martin"})
    assert both.matches(_of(ALICE, 1))
    assert not both.matches(_of(homonym, 2))  # the name does not widen
    assert both.matches(_of(renamed, 3))  # nor narrow: her statements under another name
    assert both.matches(_of({"mbox": "mailto:alice.martin@example.org"}, 4))  # or none
    assert both.name_ignored
    by_mbox = Learner.of({"mbox": "alice.martin@example.org"})
    assert by_mbox.matches(_of(renamed, 3)) and not by_mbox.matches(_of(homonym, 2))
    assert not by_mbox.name_ignored
    home = "https://pod.example.org"
    account = Learner.of({"account": {"homePage": home, "name": "amartin"}, "name": "Alice"})
    assert account.matches(
        statement(actor={"account": {"homePage": home, "name": "amartin"}, "name": "Alice"})
    )
    assert account.matches(
        statement(actor={"account": {"homePage": home, "name": "amartin"}, "name": "A."})
    )
    assert not account.matches(
        statement(actor={"account": {"homePage": home, "name": "bob"}, "name": "Alice"})
    )
    try:
        Learner.of({"name": "Alice Martin"})
    except LearnerError as exc:
        assert "--name-is-unique" in str(exc) and "name_is_unique" in str(exc)
        assert "Alice" not in str(exc)
    else:
        raise AssertionError("a name alone was taken")
    unique = Learner.of({"name": "Alice Martin"}, name_is_unique=True)
    assert unique.matches(_of(ALICE, 4)) and unique.matches(_of(homonym, 5))


def test_an_element_that_is_no_json_is_matched_on_whole_values_only():
    """For an element that is no JSON the match was a substring: alice@example.org matched
    malice@example.org, the name "Li" any element holding "Li" (review of the worker, L7)."""
    alice = Learner.of({"mbox": "alice@example.org"})
    for text in (
        '{"mbox": "mailto:malice@example.org"',
        '{"mbox": "mailto:alice@example.org.evil"',
        '{"mbox": "mailto:alice@example.organic"',
        '{"mbox": "mailto:bob.alice@example.org"',
        '{"mbox": "mailto:alice@sub-example.org"',
    ):
        assert not alice.in_text(text), text
    for text in (
        '[[{"actor": {"mbox": "mailto:Alice@Example.org", "name": "A"',
        "mbox=mailto:alice@example.org; cut",
        '\\"mbox\\": \\"mailto:alice@example.org\\"',
        "alice@example.org.",
        hashlib.sha1(b"mailto:alice@example.org", usedforsecurity=False).hexdigest() + '"',
    ):
        assert alice.in_text(text), text
    li = Learner.of({"name": "Li"}, name_is_unique=True)
    assert li.in_text('[[{"actor": {"name": "Li", "mbox": "mailto:li@x.org"')
    assert li.in_text('{"body": "[{\\"actor\\": {\\"name\\": \\"Li\\"')
    assert not li.in_text('{"actor": {"name": "Lise"}, "object": {"id": "http://Li.org/"}')
    home = "https://pod.example.org"
    account = Learner.of({"account": {"homePage": home + "/", "name": "li"}})
    assert account.in_text(f'"account": {{"homePage": "{home}", "name": "li"}}')
    assert not account.in_text(f'"account": {{"homePage": "{home}", "name": "lise"}}')
    assert not account.in_text(f'"account": {{"homePage": "{home}.evil", "name": "li"}}')
    # a name given with the mbox is not used in text either
    both = Learner.of({"mbox": "alice@example.org", "name": "Alice"})
    assert both.in_text('{"name": "Alice", "mbox": "mailto:alice@example.org"')
    assert both.in_text('{"name": "Bob", "mbox": "mailto:alice@example.org"')


def test_forget_by_name_alone_is_refused_without_the_flag_and_removes_only_that_name(
    tmp_path, redis_srv, make_config
):
    """Through the CLI: a name alone exits with a usage error and touches nothing; with
    --name-is-unique it removes that name's statements; an mbox with a name removes the
    mbox's statements, whatever name they carry, and says the name was not used."""
    config = make_config(
        "http://127.0.0.1:9/xAPI/statements/", XAPI_WORKER_SPOOL_DIR=_spool_dir(tmp_path)
    )
    client = redis_srv.client()
    homonym = agent("Alice Martin", "mailto:alice.martin@other.example.org")
    with pod_producer(redis_srv.url()) as produce:
        for n, actor in enumerate((ALICE, homonym, BOB)):
            produce(_of(actor, n))
    assert client.llen("xapi") == 3
    code, report, err = _forget(config, json.dumps({"name": "Alice Martin"}), "--wait", "0")
    assert code == 2 and "--name-is-unique" in err and "Alice" not in err, (code, err)
    assert client.llen("xapi") == 3
    by_both = json.dumps({"mbox": "alice.martin@example.org", "name": "Alice Martin"})
    code, report, err = _forget(config, by_both, "--wait", "0")
    assert code == 0 and report["removed"]["queue"] == 1, (code, report, err)
    assert "the name given was not used" in err and "Alice" not in err, err
    code, report, err = _forget(
        config, json.dumps({"name": "Alice Martin"}), "--wait", "0", "--name-is-unique"
    )
    assert code == 0 and report["removed"]["queue"] == 1, (code, report, err)
    (left,) = [decode(raw) for raw in client.lrange("xapi", 0, -1)]
    assert "bob" in json.dumps(left)


# --- every place, at rest -------------------------------------------------------------------
def _places(client: Any, spool_dir: Path, node: str) -> dict[str, list[Any]]:
    """Everything a learner's statement may be in, as it is stored."""
    spool = Spool(spool_dir, node)
    try:
        rows = [(r.id, r.statement) for r in spool.rows()]
        dead_on_disk = [raw for _, raw in DiskDeadLetters(spool, 1 << 30).rows()]
    finally:
        spool.close()
    return {
        "queue": client.lrange("xapi", 0, -1) + client.lrange("xapi\x06\x163", 0, -1),
        "in_flight": client.lrange(f"xapi.inflight.{node}", 0, -1),
        "unacked": sorted(client.hgetall("unacked").items()),
        "unacked_index": sorted(client.zrange("unacked_index", 0, -1)),
        "spool": rows,
        "dead_letters": client.lrange("xapi.dead_letters", 0, -1),
        "dead_letters_on_disk": dead_on_disk,
        "dead_letters_claimed": client.lrange(f"xapi.inflight.{node}.dead_letters", 0, -1),
        "unreadable": client.lrange("xapi.unreadable", 0, -1),
    }


def _alice_in(value: Any) -> bool:
    alice = Learner.of({"mbox": "alice.martin@example.org"})
    if isinstance(value, tuple):  # an unacked (tag, record)
        value = value[1]
    if isinstance(value, bytes):
        decoded = decode(value)
        return alice.matches(decoded) if decoded is not None else b"alice" in value.lower()
    return alice.matches(value)


def test_forget_removes_the_learner_from_every_place_and_nothing_else(
    tmp_path, redis_srv, make_config
):
    spool_dir = _spool_dir(tmp_path)
    config = make_config("http://127.0.0.1:9/xAPI/statements/", XAPI_WORKER_SPOOL_DIR=spool_dir)
    client = redis_srv.client()
    node = "gone@host"
    with pod_producer(redis_srv.url()) as delay:
        for n in range(12):
            delay(_of(ALICE if n % 2 else BOB, n))
    # one of Alice's on a priority list, one of each in a node's in-flight list
    raws = client.lrange("xapi", 0, -1)
    alice_raws = [r for r in raws if _alice_in(r)]
    bob_raws = [r for r in raws if not _alice_in(r)]
    assert len(alice_raws) == len(bob_raws) == 6
    client.lrem("xapi", 1, alice_raws[0])
    client.lpush("xapi\x06\x163", alice_raws[0])
    client.sadd("xapi.inflight", f"xapi.inflight.{node}")
    for raw in (alice_raws[1], bob_raws[0]):
        client.lrem("xapi", 1, raw)
        client.lpush(f"xapi.inflight.{node}", raw)
    # unacked records of a worker gone long ago (older than the visibility timeout)
    long_ago = time.time() - 3600
    for raw in (alice_raws[2], bob_raws[1]):
        client.lrem("xapi", 1, raw)
        payload = json.loads(raw)
        tag = payload["properties"]["delivery_tag"]
        client.hset("unacked", tag, json.dumps([payload, "", "xapi"]))
        client.zadd("unacked_index", {tag: long_ago})
    # the spool: Alice by mbox, by its SHA-1 and as another's object; Bob twice
    spool = Spool(spool_dir, node)
    spool.open()
    now = time.time()
    sha1 = hashlib.sha1(b"mailto:alice.martin@example.org", usedforsecurity=False).hexdigest()
    mentored = statement(actor=BOB)
    mentored["object"] = {"objectType": "Agent", "mbox": ALICE["mbox"]}
    spooled = [_of(ALICE, 20), _of({"mbox_sha1sum": sha1}, 21), mentored, _of(BOB, 22)]
    spooled.append(_of(BOB, 23))
    spool.add([Entry(s, f"t{n}", 2, now, now, "HTTP 503") for n, s in enumerate(spooled)])
    # the node's dead letters on its disk, and on their way there (claimed from the list)
    DiskDeadLetters(spool, 1 << 30).add(
        [
            {"statement": _of(ALICE, 40), "reason": "rejected by the LRS (HTTP 400)"},
            {"statement": _of(BOB, 41), "reason": "rejected by the LRS (HTTP 400)"},
        ]
    )
    spool.close()
    for n, who in ((42, ALICE), (43, BOB)):
        letter = {"statement": _of(who, n), "reason": "rejected by the LRS (HTTP 400)"}
        client.rpush(f"xapi.inflight.{node}.dead_letters", json.dumps(letter))
    # dead letters: two of Alice's (one a malformed task), one of Bob's; unreadable: one each
    for letter in (
        {"statement": _of(ALICE, 30), "reason": "rejected by the LRS (HTTP 400)"},
        {"statement": {"args": [_of(ALICE, 31), 1], "kwargs": {}}, "reason": "malformed task"},
        {"statement": _of(BOB, 32), "reason": "rejected by the LRS (HTTP 400)"},
    ):
        client.rpush("xapi.dead_letters", json.dumps(letter))
    client.rpush("xapi.unreadable", b"\xff not json: Alice.Martin@example.org", b"\xff bob")
    before = _places(client, spool_dir, node)

    code, report, err = _forget(config, ALICE_ON_STDIN)

    assert code == 0, err
    assert report["removed"] == {
        "queue": 4,  # three left in the queue, one on the priority list
        "in_flight": 1,
        "unacked": 1,
        "spool": 3,
        "dead_letters": 4,  # two in the broker's list, one on the disk, one claimed
        "unreadable": 1,
    }, report
    # two passes: one of Alice's was in a claim list, which its node may commit to its disk
    # after forget's first read of the disk (the second finds nothing more)
    assert report["total"] == 14 and report["passes"] == 2 and report["in_workers_hands"] == 0
    assert report["spool_files"] == 1
    assert "alice" not in (json.dumps(report) + err).lower()
    after = _places(client, spool_dir, node)
    alice_tag = json.loads(alice_raws[2])["properties"]["delivery_tag"].encode()
    for place, values in before.items():
        # nobody else's element lost, duplicated or changed; none of Alice's left
        if place == "unacked_index":
            expected = [t for t in values if t != alice_tag]
        else:
            expected = [v for v in values if not _alice_in(v)]
        assert after[place] == expected, place
    # a second run finds nothing
    code, report, _ = _forget(config, ALICE_ON_STDIN)
    assert code == 0 and report["total"] == 0


# --- while a worker runs ----------------------------------------------------------------------
def test_forget_while_a_worker_takes_loses_and_duplicates_no_one_else(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    """The LRS failing slowly (so nothing of Alice's can leave for it, and the worker keeps
    batches in its hands), a worker taking into its spool, Bob's statements still arriving:
    Alice's are removed wherever they are, in the queue, in the worker's hands (waited for,
    then met in the spool) or in the spool; once the LRS answers, every one of Bob's is
    stored, and none of Alice's."""
    down = {"now": True}

    def slow_503(_request: Any) -> tuple[int, dict[str, str], bytes] | None:
        if not down["now"]:  # decided as the request arrives: recorded before, refused
            return None
        time.sleep(0.3)
        return 503, {"Content-Type": "application/json"}, b"{}"

    proxy = Proxy(upstream_port=ralph.port, respond=slow_503).start()
    spool_dir = _spool_dir(tmp_path)
    config = make_config(
        proxy.url,
        XAPI_WORKER_SPOOL_DIR=spool_dir,
        XAPI_WORKER_BATCH_SIZE=20,
        XAPI_WORKER_RETRY_MAX_SECONDS=1,
        XAPI_WORKER_SPOOL_AFTER=1000,  # every live batch is POSTed, none spooled at once
    )
    worker = start_worker(config, name="fg")
    node = f"fg@{socket.gethostname()}"
    alice = [_of(ALICE, n) for n in range(100)]
    bob = [_of(BOB, n) for n in range(400)]
    with pod_producer(redis_srv.url()) as delay:
        for a, b in zip(alice, bob[:100], strict=True):
            delay(a)
            delay(b)
    client = redis_srv.client()
    assert wait_for(lambda: _spool_depth(spool_dir, node) > 0, 30), worker.text()[-2000:]
    assert client.llen("xapi") > 0 and client.hlen("unacked") > 0

    def more_of_bob() -> None:
        with pod_producer(redis_srv.url()) as delay:
            for b in bob[100:]:
                delay(b)
                time.sleep(0.005)

    producer = threading.Thread(target=more_of_bob)
    producer.start()
    code, report, err = _forget(config, ALICE_ON_STDIN, "--wait", "60")
    producer.join()
    assert code == 0, (err, report)
    assert report["total"] >= len(alice), report
    down["now"] = False
    expected = {s["id"] for s in bob}
    assert wait_for(lambda: expected <= set(ralph.stored_ids()), 120), worker.text()[-3000:]
    assert wait_for(
        lambda: (
            client.llen("xapi") == 0
            and client.hlen("unacked") == 0
            and _spool_depth(spool_dir, node) == 0
        ),
        30,
    )
    stored = ralph.stored_ids()
    assert not {s["id"] for s in alice} & set(stored), "a statement of Alice's reached the LRS"
    # Bob's: every one stored, once (a POST re-sent after a timeout under load is the
    # worker's own, idempotent by id; forget's removals leave no copy: the test above).
    assert sorted(stored) == sorted(expected)
    assert client.llen("xapi.dead_letters") == 0
    proxy.stop()


def _spool_depth(directory: Path, node: str) -> int:
    if not (directory / node_file(node)).exists():
        return 0
    spool = Spool(directory, node)
    try:
        return spool.stats().depth
    finally:
        spool.close()


def _alice_queued(client: Any) -> int:
    """Alice's statements in the queue and unacked (the worker's hands), by id."""
    found = set()
    for raw in client.lrange("xapi", 0, -1) + list(client.hvals("unacked")):
        value = decode(raw)
        if isinstance(value, list) and len(value) == 2 and _alice_in(value[1]):
            args = value[1][0] if isinstance(value[1], list) and value[1] else []
            if args and isinstance(args[0], dict):
                found.add(args[0].get("id"))
    return len(found)


def test_forget_never_says_complete_while_a_worker_holds_the_learners_statements(
    redis_srv, ralph, make_config, start_worker
):
    """The LRS failing, the spool off: each of Alice's statements is a retry a worker holds
    for its countdown. The last pass used to remove those records under the worker and report
    the run complete (exit 0, in_workers_hands 0); the worker then re-published them, and they
    reached the LRS once it came back (review H2). Now a held record is never counted as
    removed: the run says it is incomplete (exit 10), or none of Alice's comes back."""
    proxy = Proxy(
        upstream_port=ralph.port,
        respond=lambda _r: (503, {"Content-Type": "application/json"}, b"{}"),
    ).start()
    try:
        config = make_config(proxy.url, XAPI_WORKER_BATCH_SIZE=5)
        worker = start_worker(config, name="held")
        client = redis_srv.client()
        with pod_producer(redis_srv.url()) as delay:
            for n in range(5):
                delay(_of(ALICE, n))
                delay(_of(BOB, 100 + n))
        assert wait_for(lambda: "retry" in worker.text(), 30), worker.text()[-2000:]
        code, report, err = _forget(config, ALICE_ON_STDIN, "--wait", "60")
        time.sleep(5)  # the worker settles what it held: retries back on the queue
        left = _alice_queued(client)
        assert code in (0, 10), err
        assert code == 10 or left == 0, (code, report, left)
        if code == 10:
            assert report["in_workers_hands"] > 0, report
    finally:
        proxy.stop()


def test_the_dead_letter_of_an_unreadable_message_of_the_learner_is_matched():
    """A message the worker could not read is dead-lettered with the head of its body as
    text (consumer.py): the learner's agent is in that text, which forget never looked into
    (review M4)."""
    from xapi_worker.consumer import body_summary
    from xapi_worker.forget import belongs

    class Message:
        body = json.dumps([[_of(ALICE, 1)], {}, {"nested": [[[[1]]]]}]).encode() + b"\xff"

    letter = {"statement": body_summary(Message()), "reason": "not decodable: ..."}
    alice = Learner.of({"mbox": "alice.martin@example.org"})
    assert belongs(alice, json.dumps(letter).encode())
    assert not belongs(Learner.of({"mbox": "bob.durand@example.org"}), json.dumps(letter))


def test_forget_is_incomplete_when_a_spool_file_was_not_read(tmp_path, redis_srv, make_config):
    """A spool file forget cannot read (here of a newer format; damaged or locked alike) may
    hold the learner's statements: the run used to say it was complete (exit 0; a newer
    format even stopped it before the dead letters), and a file set aside as damaged, which
    `spool drain` would put back, was only counted (review M2). Now forget goes on with the
    other places and exits 10, saying which files it could not read."""
    import sqlite3

    spool_dir = _spool_dir(tmp_path)
    config = make_config("http://127.0.0.1:9/xAPI/statements/", XAPI_WORKER_SPOOL_DIR=spool_dir)
    newer = sqlite3.connect(spool_dir / "newer@host.sqlite3")
    newer.execute("CREATE TABLE spool (id INTEGER PRIMARY KEY)")
    newer.execute("PRAGMA user_version = 99")
    newer.commit()
    newer.close()
    client = redis_srv.client()
    letter = {"statement": _of(ALICE, 1), "reason": "rejected by the LRS (HTTP 400)"}
    client.rpush("xapi.dead_letters", json.dumps(letter))

    code, report, err = _forget(config, ALICE_ON_STDIN, "--wait", "1")

    assert code == 10, (code, report, err)
    assert report["spool_files_not_read"] == 1 and report["removed"]["dead_letters"] == 1
    assert "could not be read" in err and "alice" not in err.lower()
    (spool_dir / "newer@host.sqlite3").unlink()
    (spool_dir / "gone@host.sqlite3.damaged-20260101T000000Z").write_bytes(b"x")
    code, report, err = _forget(config, ALICE_ON_STDIN, "--wait", "1")
    assert code == 10 and report["spool_damaged_files_not_read"] == 1, (code, report, err)
    # Drained by `spool drain` (renamed .salvaged): running forget again after it no longer
    # helps, so forget says what does (review s5 L6): remove the file, whose statements are
    # in the spool now. The file still holds copies forget does not open: still incomplete.
    (spool_dir / "gone@host.sqlite3.damaged-20260101T000000Z").rename(
        spool_dir / "gone@host.sqlite3.damaged-20260101T000000Z.salvaged"
    )
    code, report, err = _forget(config, ALICE_ON_STDIN, "--wait", "1")
    assert code == 10, (code, report, err)
    assert report["spool_damaged_files_not_read"] == 0, report
    assert report["spool_salvaged_files_not_read"] == 1, report
    assert "remove them once inspected" in err and "run forget again right after" not in err


# --- the broker's dead letters on their way to a node's disk ----------------------------------
def _in_process(tmp_path: Path, redis_srv: Any) -> tuple[Any, Path]:
    from xapi_worker.settings import load_settings

    spool_dir = _spool_dir(tmp_path)
    settings = load_settings(
        {
            "XAPI_LRS_URL": "http://127.0.0.1:9/xAPI/statements/",
            "XAPI_LRS_LOGIN": "u",
            "XAPI_LRS_PWD": "p",
            "XAPI_CELERY_BROKER_URL": redis_srv.url(),
            "XAPI_WORKER_SPOOL_DIR": str(spool_dir),
        }
    )
    _open_close(spool_dir)
    return settings, spool_dir


def _open_close(spool_dir: Path) -> None:
    spool = Spool(spool_dir, "mover@host")
    spool.open()
    spool.close()


def _disk_letters_of_alice(spool_dir: Path, settings: Any) -> int:
    from xapi_worker.deadstore import disk_dead_letters
    from xapi_worker.forget import belongs

    spool = Spool(spool_dir, "mover@host")
    try:
        alice = Learner.of(json.loads(ALICE_ON_STDIN))
        return sum(belongs(alice, raw) for _, raw in disk_dead_letters(spool, settings).rows())
    finally:
        spool.close()


def _alice_letter(n: int) -> bytes:
    return json.dumps({"statement": _of(ALICE, n), "reason": "rejected (HTTP 400)"}).encode()


def test_a_dead_letter_moved_to_the_disk_during_forget_is_met_there(tmp_path, redis_srv):
    """forget read this host's disk before the broker's list, while dead letters travel the
    list -> a node's claim list -> its disk: one a node moved between the two reads was
    missed, and the run said complete (review s5 M2). A node's move is made to land right
    after forget's disk read; the broker's list is read first now, so forget meets it."""
    from xapi_worker.deadstore import disk_dead_letters, move_legacy
    from xapi_worker.forget import Forgetter

    settings, spool_dir = _in_process(tmp_path, redis_srv)
    client = redis_srv.client()
    client.rpush("xapi.dead_letters", _alice_letter(1))

    class MovedAfterTheDiskRead(Forgetter):
        def _spools(self) -> tuple[int, int, int, int, int]:
            out = super()._spools()
            spool = Spool(spool_dir, "mover@host")
            try:
                move_legacy(
                    client,
                    "xapi.dead_letters",
                    "xapi.inflight.mover@host.dead_letters",
                    disk_dead_letters(spool, settings),
                )
            finally:
                spool.close()
            return out

    report = MovedAfterTheDiskRead(
        settings, client, Learner.of(json.loads(ALICE_ON_STDIN)), 0
    ).run()
    assert report.complete and report.removed["dead_letters"] == 1
    assert _disk_letters_of_alice(spool_dir, settings) == 0


def test_a_claimed_dead_letter_committed_after_forgets_disk_read_is_met_by_another_pass(
    tmp_path, redis_srv
):
    """A node read its claim list, forget removed the learner's element from it and read the
    disk, then the node committed what it had read: forget makes another pass, as a claim
    list held one of the learner's, and erases it from the disk."""
    from xapi_worker.deadstore import disk_dead_letters
    from xapi_worker.forget import Forgetter

    settings, spool_dir = _in_process(tmp_path, redis_srv)
    client = redis_srv.client()
    node = "xapi.inflight.mover@host"
    claim = node + ".dead_letters"
    client.sadd("xapi.inflight", node)
    client.rpush(claim, _alice_letter(2))
    read_by_the_node = client.lrange(claim, 0, -1)
    commits = []

    class CommittedAfterTheDiskRead(Forgetter):
        def _spools(self) -> tuple[int, int, int, int, int]:
            out = super()._spools()
            if not commits:
                spool = Spool(spool_dir, "mover@host")
                try:
                    commits.append(disk_dead_letters(spool, settings).add_raw(read_by_the_node))
                finally:
                    spool.close()
                client.delete(claim)
            return out

    report = CommittedAfterTheDiskRead(
        settings, client, Learner.of(json.loads(ALICE_ON_STDIN)), 0
    ).run()
    assert commits == [1]
    assert report.complete and report.passes >= 2
    assert _disk_letters_of_alice(spool_dir, settings) == 0


# --- the worker's own passes removing elements meanwhile --------------------------------------
def test_the_hourly_purge_running_during_forget_makes_it_skip_none_of_the_learners(
    tmp_path, redis_srv
):
    """forget reads a list a chunk at a time from its head; the drainer's hourly purge
    removes the expired dead letters there meanwhile, which moved the learner's ones left
    past where forget read on: they were skipped and the run said complete (review of the
    worker, L2). The real purge is made to run right after forget's first chunk."""
    from xapi_worker.deadletters import RedisAccess
    from xapi_worker.forget import CHUNK, Forgetter

    settings, _ = _in_process(tmp_path, redis_srv)
    client = redis_srv.client()
    key = settings.dead_letter_key

    def letter(actor: dict[str, Any], n: int, written: str) -> bytes:
        entry = {"statement": _of(actor, n), "reason": "rejected (HTTP 400)", "time": written}
        return json.dumps(entry).encode()

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    expired = [letter(BOB, n, "2020-01-01T00:00:00Z") for n in range(CHUNK + 100)]
    alices = [letter(ALICE, 10_000 + n, now) for n in range(10)]
    recent = [letter(BOB, 20_000 + n, now) for n in range(CHUNK + 100)]
    client.rpush(key, *expired, *alices, *recent)  # appended: the oldest at the head
    purged: list[int] = []

    class PurgedAfterTheFirstChunk:
        """The broker as forget sees it: the hourly purge runs once forget has read the
        first chunk of the dead letters."""

        def __init__(self, real: Any) -> None:
            self._real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

        def lrange(self, name: str, start: int, end: int) -> Any:
            chunk = self._real.lrange(name, start, end)
            if name == key and start == 0 and not purged:
                purged.append(RedisAccess(settings).purge_older(30))
            return chunk

    report = Forgetter(
        settings, PurgedAfterTheFirstChunk(client), Learner.of(json.loads(ALICE_ON_STDIN)), 0
    ).run()
    assert purged == [len(expired)]
    assert report.removed["dead_letters"] == len(alices), report.as_dict()
    assert report.complete
    assert client.lrange(key, 0, -1) == recent
