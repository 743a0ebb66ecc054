"""The pure parts: settings parsing, masking, ids, classification, bisection, backoff."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xapi_worker.bookkeeping import (
    ATTEMPT,
    BODY_SHA256,
    body_digest,
    derive_key,
    is_signed,
    sign,
    signed_headers,
)
from xapi_worker.delivery import (
    POISON_AFTER,
    Answer,
    Item,
    Kind,
    Verdict,
    classify,
    deliver,
    ensure_statement_id,
    merge_duplicates,
    parse_retry_after,
    retry_delay,
)
from xapi_worker.settings import (
    Settings,
    SettingsError,
    load_settings,
    mask_url,
    parse_config_text,
    settings_from_mapping,
)

BASE = {
    "XAPI_LRS_URL": "http://lrs.example.org/xAPI/statements/",
    "XAPI_LRS_LOGIN": "pod",
    "XAPI_LRS_PWD": "pw-123",
    "XAPI_CELERY_BROKER_URL": "redis://:brokerpw@frontal:6379/6",
}


def test_config_file_format():
    text = """
# comment
export XAPI_LRS_LOGIN=pod
XAPI_LRS_PWD='p#w = "x"'
XAPI_LRS_URL="http://h/xAPI/statements/"
XAPI_WORKER_CA_BUNDLE=
EMPTY=""
"""
    values = parse_config_text(text)
    assert values == {
        "XAPI_LRS_LOGIN": "pod",
        "XAPI_LRS_PWD": 'p#w = "x"',
        "XAPI_LRS_URL": "http://h/xAPI/statements/",
        "XAPI_WORKER_CA_BUNDLE": "",
        "EMPTY": "",
    }
    with pytest.raises(SettingsError, match="line 1"):
        parse_config_text("no equal sign")
    with pytest.raises(SettingsError, match="unterminated"):
        parse_config_text("A='open")


def test_env_overrides_file(tmp_path):
    path = tmp_path / "w.env"
    path.write_text("\n".join(f"{k}={v}" for k, v in BASE.items()) + "\nXAPI_WORKER_BATCH_SIZE=7\n")
    s = load_settings({"XAPI_WORKER_CONFIG": str(path), "XAPI_WORKER_BATCH_SIZE": "9"})
    assert s.batch_size == 9
    assert s.lrs_login == "pod"
    assert s.effective_prefetch_multiplier == 18


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("XAPI_LRS_URL", "", "XAPI_LRS_URL is not set"),
        ("XAPI_LRS_URL", "ftp://x/", "XAPI_LRS_URL must be a URL"),
        ("XAPI_CELERY_BROKER_URL", "amqp://guest@x//", "XAPI_CELERY_BROKER_URL"),
        ("XAPI_WORKER_BATCH_SIZE", "0", "XAPI_WORKER_BATCH_SIZE must be greater than 0"),
        ("XAPI_WORKER_READ_TIMEOUT", "soon", "XAPI_WORKER_READ_TIMEOUT must be a number"),
        ("XAPI_WORKER_CA_BUNDLE", "/nonexistent.pem", "XAPI_WORKER_CA_BUNDLE"),
        ("XAPI_WORKER_VISIBILITY_TIMEOUT", "60", "XAPI_WORKER_VISIBILITY_TIMEOUT must exceed"),
    ],
)
def test_bad_settings_named(key, value, message):
    with pytest.raises(SettingsError, match=message) as info:
        settings_from_mapping({**BASE, key: value})
    assert "pw-123" not in str(info.value) and "brokerpw" not in str(info.value)


def test_unknown_worker_key_in_file(tmp_path):
    path = tmp_path / "w.env"
    path.write_text("XAPI_WORKER_BACTH_SIZE=3\n")
    with pytest.raises(SettingsError, match="XAPI_WORKER_BACTH_SIZE"):
        load_settings({"XAPI_WORKER_CONFIG": str(path)})


def test_missing_config_file_named():
    with pytest.raises(SettingsError, match="XAPI_WORKER_CONFIG"):
        load_settings({"XAPI_WORKER_CONFIG": "/nonexistent/worker.env"})


def test_secrets_taken_verbatim(tmp_path):
    """A password of any printable character, spaces at both ends included, read back from a
    file written as the role writes it (double quotes, \\ and \" escaped)."""
    password = " " + "".join(chr(c) for c in range(33, 127)) + ' \\" \\\\" '
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    path = tmp_path / "worker.env"
    lines = [f'{k}="{v}"' for k, v in BASE.items() if k != "XAPI_LRS_PWD"]
    path.write_text("\n".join([*lines, f'XAPI_LRS_PWD="{quoted}"']) + "\n")
    settings = load_settings({"XAPI_WORKER_CONFIG": str(path)})
    assert settings.lrs_password == password


def test_secrets_masked():
    s = settings_from_mapping(BASE)
    assert "pw-123" not in repr(s) and "brokerpw" not in repr(s)
    assert s.broker_url_masked == "redis://:****@frontal:6379/6"
    assert mask_url("redis://user:pw@h:1/0") == "redis://user:****@h:1/0"
    assert mask_url("http://h/x") == "http://h/x"
    assert "pw-123" not in str(s.public_view())
    assert isinstance(s, Settings)


def test_deterministic_ids():
    a, b = {"verb": {}}, {"verb": {}}
    assert ensure_statement_id(a, "task-1") == ensure_statement_id(b, "task-1")
    assert ensure_statement_id({}, "task-2") != a["id"]
    given = {"id": "0f7e3a1c-0000-4000-8000-000000000001"}
    assert ensure_statement_id(given, "task-3") == "0f7e3a1c-0000-4000-8000-000000000001"


def test_classify():
    assert classify(None) is Kind.TRANSIENT
    assert classify(200) is Kind.OK and classify(204) is Kind.OK
    assert classify(401) is Kind.AUTH and classify(403) is Kind.AUTH
    assert classify(404) is Kind.CONFIG
    assert classify(429) is Kind.TRANSIENT and classify(503) is Kind.TRANSIENT
    assert classify(400) is Kind.REJECTED and classify(422) is Kind.REJECTED
    assert classify(409) is Kind.REJECTED
    assert classify(407) is Kind.CONFIG and classify(415) is Kind.CONFIG
    assert classify(400, "X-Experience-API-Version header is missing") is Kind.CONFIG


def _items(n, bad=(), attempt=1):
    return [Item(f"t{i}", {"id": f"s{i}", "bad": i in bad}, attempt=attempt) for i in range(n)]


def _ok(batch):
    return Answer(status=200, ids=tuple(s["id"] for s in batch))


def _fake_lrs(status_for_bad=422, calls=None):
    def send(batch):
        if calls is not None:
            calls.append(len(batch))
        if any(s["bad"] for s in batch):
            return Answer(status=status_for_bad, excerpt="bad statement")
        return _ok(batch)

    return send


def test_bisection_isolates_bad_statements():
    calls = []
    results = deliver(_items(10, bad={3, 8}), _fake_lrs(calls=calls))
    verdicts = {r.item.key: r.verdict for r in results}
    assert verdicts.pop("t3") is Verdict.DEAD and verdicts.pop("t8") is Verdict.DEAD
    assert set(verdicts.values()) == {Verdict.DELIVERED}
    assert len(results) == 10
    assert calls[0] == 10 and len(calls) < 20


def test_only_a_verified_answer_is_a_delivery():
    """A 2xx is a delivery only as 204, or 200 with a JSON array of ids that were sent."""
    sent = _items(3)

    def answering(answer):
        return deliver(sent, lambda batch: answer)[0]

    assert answering(Answer(status=204)).verdict is Verdict.DELIVERED
    assert answering(Answer(status=200, ids=("s0", "s1", "s2"))).verdict is Verdict.DELIVERED
    assert answering(Answer(status=200, ids=("s1",))).verdict is Verdict.DELIVERED  # Ralph
    assert answering(Answer(status=200, ids=())).verdict is Verdict.DELIVERED
    for answer in (
        Answer(status=200, excerpt="<html>Maintenance</html>"),  # a proxy's page
        Answer(status=200, ids=("s0", "someone-else")),
        Answer(status=201, ids=("s0",)),
        Answer(status=202),
    ):
        res = answering(answer)
        assert res.verdict is Verdict.RETRY, answer
        assert res.answer.kind is Kind.TRANSIENT and res.answer.unverified


def _conflict_lrs(stored):
    def send(batch):
        if any(s["bad"] for s in batch):
            return Answer(status=409, excerpt="Differing statements already exist")
        return _ok(batch)

    def fetch(statement_id):
        return Answer(status=200), stored.get(statement_id)

    return send, fetch


def test_conflict_same_content_is_delivered_different_is_dead():
    items = _items(4, bad={1, 2})
    same = dict(items[1].statement, stored="2026-12-01T10:00:00+00:00", authority={"x": 1})
    other = dict(items[2].statement, verb={"id": "http://example.org/other"})
    send, fetch = _conflict_lrs({"s1": same, "s2": other})
    by_key = {r.item.key: r for r in deliver(items, send, fetch=fetch)}
    assert by_key["t1"].verdict is Verdict.DUPLICATE  # LRS-set properties do not count
    assert by_key["t2"].verdict is Verdict.DEAD
    conflict = by_key["t2"].conflict
    assert conflict["id"] == "s2" and conflict["sent_sha256"] != conflict["stored_sha256"]
    assert "different statement" in by_key["t2"].reason
    assert by_key["t0"].verdict is by_key["t3"].verdict is Verdict.DELIVERED
    # The stored one cannot be read: nothing is decided, the statement stays queued.
    send, _ = _conflict_lrs({})
    res = deliver(_items(1, bad={0}), send, fetch=lambda i: (Answer(status=None, error="x"), None))
    assert res[0].verdict is Verdict.RETRY


def test_configuration_errors_are_retried_not_bisected():
    for answer in (
        Answer(status=400, excerpt='{"detail":"X-Experience-API-Version header missing"}'),
        Answer(status=407),
        Answer(status=415),
        Answer(status=426),
        Answer(status=431),
    ):
        calls = []

        def send(batch, answer=answer, calls=calls):
            calls.append(len(batch))
            return answer

        results = deliver(_items(8), send)
        assert {r.verdict for r in results} == {Verdict.RETRY}, answer
        assert calls == [8] and answer.kind is Kind.CONFIG


def _poison_lrs(calls, down=False):
    def send(batch):
        calls.append(len(batch))
        if down or any(s["bad"] for s in batch):
            return Answer(status=500, excerpt="Statements bulk indexation failed")
        return _ok(batch)

    return send


def test_poison_statement_is_isolated_after_a_few_failures():
    calls = []
    # The first failures: the batch is retried whole (the LRS may be failing for all).
    results = deliver(_items(16, bad={0}), _poison_lrs(calls))
    assert {r.verdict for r in results} == {Verdict.RETRY} and calls == [16]
    # Tried three times: split; its 15 batch-mates are delivered. The culprit, failing alone
    # (twice in a row) while others are stored, counts one lone failure and is kept.
    calls.clear()
    items = _items(16, bad={0}, attempt=3)
    results = deliver(items, _poison_lrs(calls))
    verdicts = {r.item.key: r.verdict for r in results}
    assert verdicts.pop("t0") is Verdict.RETRY and items[0].lone_failures == 1
    assert set(verdicts.values()) == {Verdict.DELIVERED}
    assert len(calls) <= 2 * 4 + 3  # about two POSTs per halving, and a second look
    # Alone in later exchanges, the LRS storing others just before: one more each time,
    # dead-lettered at POISON_AFTER with its reason.
    poison = items[0]
    for n in range(2, POISON_AFTER + 1):
        (res,) = deliver([poison], _poison_lrs([]), stored_before=True)
        assert poison.lone_failures == n
        assert res.verdict is (Verdict.DEAD if n == POISON_AFTER else Verdict.RETRY)
    assert "alone" in res.reason and "HTTP 500" in res.reason
    assert f"in {POISON_AFTER} separate exchanges" in res.reason
    # Alone with nothing stored anywhere: no evidence, nothing counted.
    fresh = _items(1, bad={0}, attempt=9)
    (res,) = deliver(fresh, _poison_lrs([]))
    assert res.verdict is Verdict.RETRY and fresh[0].lone_failures == 0
    # A fresh statement failing alone is kept for another attempt, not dead-lettered.
    items = _items(4, bad={2})
    items[0].attempt = 3
    results = {r.item.key: r.verdict for r in deliver(items, _poison_lrs([]))}
    assert results["t2"] is Verdict.RETRY and results["t0"] is Verdict.DELIVERED


def test_an_lrs_failing_for_everything_stops_the_split_early():
    calls = []
    results = deliver(_items(100, attempt=5), _poison_lrs(calls, down=True))
    assert {r.verdict for r in results} == {Verdict.RETRY}
    assert len(results) == 100
    assert len(calls) <= 12  # down the left side, then stop: not 2N-1 = 199


def test_transient_halts_and_retries_the_rest():
    answers = iter(
        [Answer(status=422), Answer(status=200, ids=()), Answer(status=None, error="down")]
    )
    results = deliver(_items(8), lambda batch: next(answers))
    verdicts = [r.verdict for r in results]
    assert verdicts.count(Verdict.DELIVERED) == 4 and verdicts.count(Verdict.RETRY) == 4


def test_merge_duplicates():
    items = [*_items(3), Item("t9", {"id": "s1", "bad": False})]
    leaders = merge_duplicates(items)
    assert [i.key for i in leaders] == ["t0", "t1", "t2"]
    assert [f.key for f in leaders[1].followers] == ["t9"]
    # The same id with another content stays apart (a conflict for the LRS to answer), and
    # statements without a string id are compared by content.
    apart = merge_duplicates(
        [
            Item("a", {"id": "s1", "v": 1}),
            Item("b", {"id": "s1", "v": 2}),
            Item("c", {"v": 3}),
            Item("d", {"v": 3}),
            Item("e", {"id": ["x"], "v": 4}),
        ]
    )
    assert [i.key for i in apart] == ["a", "b", "c", "e"]
    assert [f.key for f in apart[2].followers] == ["d"]


def test_retry_delay_bounds():
    assert retry_delay(1, 2, 300, rng=lambda: 0.0) == 1.0
    assert retry_delay(1, 2, 300, rng=lambda: 1.0) == 2.0
    assert retry_delay(4, 2, 300, rng=lambda: 1.0) == 16.0
    assert retry_delay(40, 2, 300, rng=lambda: 1.0) == 300.0
    assert retry_delay(1, 2, 300, retry_after=30, rng=lambda: 0.0) == 30.0
    assert retry_delay(1, 2, 300, retry_after=9999, rng=lambda: 0.0) == 300.0


def test_parse_retry_after():
    assert parse_retry_after("12", 0, 3600.0) == 12.0
    assert parse_retry_after(None, 0, 3600.0) is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40.0, 3600.0) == 60.0
    assert parse_retry_after("garbage", 0, 3600.0) is None


def test_answer_excerpt_masked_before_it_is_cut():
    from xapi_worker.lrs import EXCERPT_CHARS, excerpt

    secret = "s3cr/et+pass word"
    text = "x" * (EXCERPT_CHARS - 5) + secret + " and " + "s3cr%2Fet%2Bpass%20word"
    cut = excerpt(text, secret)
    assert "s3cr" not in cut and len(cut) <= EXCERPT_CHARS


def test_any_content_has_a_json_text_and_a_reason_when_unsendable():
    from xapi_worker.content import (
        CUT_MARKER,
        LONE_SURROGATE,
        NOT_A_NUMBER,
        TOO_DEEP,
        json_text,
        problem,
    )

    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    assert problem({"s": "caf\u00e9 \x00 \U0001f3ac"}) is None
    assert problem({"s": "\ud83c"}) == LONE_SURROGATE
    assert problem({"n": float("inf")}) == NOT_A_NUMBER
    assert problem({"d": deep}) == TOO_DEEP
    assert json_text({"s": "caf\u00e9"}) == '{"s":"caf\u00e9"}'  # plain UTF-8 when it can be
    assert json_text({"s": "\ud83c"}) == '{"s":"\\ud83c"}'  # escaped when it cannot
    assert json.loads(json_text({"s": "\ud83c"})) == {"s": "\ud83c"}
    cut = json.loads(json_text({"d": deep}))
    for _ in range(64):
        cut = cut["d"] if isinstance(cut, dict) else cut[0]
    assert cut == CUT_MARKER


def test_retry_after_is_capped():
    """A Retry-After of a date in 2028 used to hold every POST for 389 days."""
    from xapi_worker.settings import Settings

    cap = Settings.__dataclass_fields__["retry_after_max_seconds"].default
    assert cap == 3600.0
    now = 1_796_000_000.0  # 2026-11-30
    assert parse_retry_after("Fri, 01 Dec 2028 00:00:00 GMT", now, cap) == cap
    assert parse_retry_after("99999999999999999999", now, cap) == cap
    assert parse_retry_after("120", now, cap) == 120.0
    assert parse_retry_after("120", now, 60.0) == 60.0  # XAPI_WORKER_RETRY_AFTER_MAX_SECONDS


def test_a_split_stops_at_its_deadline():
    """A split of a batch of rejected statements took 2N-1 POSTs whatever their time: with
    slow answers it outlasted the visibility timeout, and the messages came back to another
    consumer while still being worked on. No POST starts after the deadline now."""
    now = [0.0]
    calls = []

    def slow(batch):
        calls.append(len(batch))
        now[0] += 1.0  # each POST takes a second
        return Answer(status=422, excerpt="bad") if len(batch) > 1 else _ok(batch)

    results = deliver(_items(100), slow, deadline=10.0, clock=lambda: now[0])
    assert len(calls) == 10 and now[0] == 10.0
    assert len(results) == 100
    retried = [r for r in results if r.verdict is Verdict.RETRY]
    assert retried and all("time is up" in r.answer.what for r in retried)
    assert {r.verdict for r in results} <= {Verdict.RETRY, Verdict.DELIVERED}


def test_the_bookkeeping_signature_reads_one_way_only():
    """The values were joined by a newline: ("t\\n1", 2) and ("t", "1\\n2") had one MAC, so
    a signature made for one set of headers held for another. Each value now has its length."""
    key = derive_key("lrs", "redis://u:p@h/0")
    assert sign(key, "t\n1", 2, "2026-01-01", 0) != sign(key, "t", "1\n2", "2026-01-01", 0)  # type: ignore[arg-type]
    headers = signed_headers(key, "t\n1", 2, "2026-01-01", 0)
    forged = {**headers, ATTEMPT: "1\n2"}
    assert is_signed(key, "t\n1", headers)
    assert not is_signed(key, "t", forged)


@settings(max_examples=200, deadline=None)
@given(
    eta=st.one_of(st.none(), st.text()),
    body=st.binary(),
    other_eta=st.one_of(st.none(), st.text()),
    other_body=st.binary(),
)
def test_a_signature_holds_for_its_own_eta_and_body_only(eta, body, other_eta, other_body):
    """The signature covers the ``eta`` and the body's digest (review of the worker, L8): a
    header set signed for one message holds for no other body, no other ``eta``."""
    key = derive_key("lrs", "redis://u:p@h/0")
    digest = body_digest(body)
    headers = {**signed_headers(key, "t", 2, "2026-01-01", 0, eta, digest), "eta": eta}
    assert is_signed(key, "t", {**headers, BODY_SHA256: digest})
    moved = {**headers, "eta": other_eta, BODY_SHA256: body_digest(other_body)}
    assert is_signed(key, "t", moved) == ((other_eta or "") == (eta or "") and other_body == body)
