"""The pure parts: settings parsing, masking, ids, classification, bisection, backoff."""

from __future__ import annotations

import pytest
from xapi_worker.delivery import (
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


def _items(n, bad=(), sent_before=False):
    return [
        Item(f"t{i}", {"id": f"s{i}", "bad": i in bad}, maybe_sent_before=sent_before)
        for i in range(n)
    ]


def _fake_lrs(status_for_bad=422, calls=None):
    def send(batch):
        if calls is not None:
            calls.append(len(batch))
        if any(s["bad"] for s in batch):
            return Answer(status=status_for_bad, excerpt="bad statement")
        return Answer(status=200)

    return send


def test_bisection_isolates_bad_statements():
    calls = []
    results = deliver(_items(10, bad={3, 8}), _fake_lrs(calls=calls))
    verdicts = {r.item.key: r.verdict for r in results}
    assert verdicts.pop("t3") is Verdict.DEAD and verdicts.pop("t8") is Verdict.DEAD
    assert set(verdicts.values()) == {Verdict.DELIVERED}
    assert len(results) == 10
    assert calls[0] == 10 and len(calls) < 20


def test_conflict_after_earlier_attempt_is_duplicate():
    results = deliver(_items(1, bad={0}, sent_before=True), _fake_lrs(409))
    assert results[0].verdict is Verdict.DUPLICATE
    results = deliver(_items(1, bad={0}), _fake_lrs(409))
    assert results[0].verdict is Verdict.DEAD


def test_transient_halts_and_retries_the_rest():
    answers = iter([Answer(status=422), Answer(status=200), Answer(status=None, error="down")])
    results = deliver(_items(8), lambda batch: next(answers))
    verdicts = [r.verdict for r in results]
    assert verdicts.count(Verdict.DELIVERED) == 4 and verdicts.count(Verdict.RETRY) == 4


def test_merge_duplicates():
    items = [*_items(3), Item("t9", {"id": "s1", "bad": False})]
    leaders = merge_duplicates(items)
    assert [i.key for i in leaders] == ["t0", "t1", "t2"]
    assert [f.key for f in leaders[1].followers] == ["t9"]


def test_retry_delay_bounds():
    assert retry_delay(1, 2, 300, rng=lambda: 0.0) == 1.0
    assert retry_delay(1, 2, 300, rng=lambda: 1.0) == 2.0
    assert retry_delay(4, 2, 300, rng=lambda: 1.0) == 16.0
    assert retry_delay(40, 2, 300, rng=lambda: 1.0) == 300.0
    assert retry_delay(1, 2, 300, retry_after=30, rng=lambda: 0.0) == 30.0
    assert retry_delay(1, 2, 300, retry_after=9999, rng=lambda: 0.0) == 300.0


def test_parse_retry_after():
    assert parse_retry_after("12", 0) == 12.0
    assert parse_retry_after(None, 0) is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60.0
    assert parse_retry_after("garbage", 0) is None
