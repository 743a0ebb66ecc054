"""Pod's request is never held long by the broker (docs/reliability.md, "Pod's publish").

Pod's own .delay() (its task module, unchanged) on the deployed frontal, while the xAPI
instance is stopped, hung (SIGSTOP for 10 s) and restarted. The bundle bounds it through
pod/custom/xapi_celery.py, which the block of settings_local.py names as
CELERY_CONFIG_MODULE: every call returns or fails within 2 s, and a restart loses nothing.
"""

from __future__ import annotations

import json

from xapi_testsupport.pod_on_host import as_pod_python, missing_from_lrs
from xapi_testsupport.polling import wait_until

UNIT = "redis-server@xapi"
BOUND = 2.0

# Calls Pod's .delay() every 50 ms for argv[1] seconds (or once), timing each one.
TIMED = """
import json, sys, time, uuid
from pod.xapi.xapi_tasks import send_xapi_statement_task
calls, end = [], time.monotonic() + float(sys.argv[1])
while True:
    sid, began = str(uuid.uuid4()), time.monotonic()
    try:
        send_xapi_statement_task.delay({
            "id": sid, "actor": {"objectType": "Agent", "mbox": "mailto:bounds@example.org"},
            "verb": {"id": "https://w3id.org/xapi/video/verbs/played"},
            "object": {"objectType": "Activity", "id": "https://pod.example.org/video/0001/"}})
        outcome = "ok"
    except Exception as error:
        outcome = type(error).__name__
    calls.append([sid, outcome, time.monotonic() - began])
    if time.monotonic() >= end:
        break
    time.sleep(0.05)
print(json.dumps(calls))
"""


def timed_calls(frontal, seconds: float, during: str = "") -> list[list]:
    """Runs TIMED on the frontal, with `during` (a shell line) run beside it."""
    if during:
        frontal.run(f"nohup sh -c {json.dumps(during)} >/dev/null 2>&1 &")
    result = as_pod_python(frontal, TIMED, str(seconds))
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def test_celery_config_module_named_in_the_block(frontal):
    text = frontal.file(
        "/usr/local/django_projects/podv4/pod/custom/settings_local.py"
    ).content_string
    assert 'setdefault("CELERY_CONFIG_MODULE", "pod.custom.xapi_celery")' in text


# Pod's .delay() once, with a receiver that keeps the headers Celery publishes.
STAMPED = """
import json
from celery.signals import before_task_publish
from pod.xapi.xapi_tasks import send_xapi_statement_task
published = []
before_task_publish.connect(
    lambda sender=None, headers=None, **_: published.append(headers), weak=False)
send_xapi_statement_task.delay({
    "actor": {"objectType": "Agent", "mbox": "mailto:stamp@example.org"},
    "verb": {"id": "https://w3id.org/xapi/video/verbs/played"},
    "object": {"objectType": "Activity", "id": "https://pod.example.org/video/0001/"}})
print(json.dumps(published[0].get("xapi_first_seen")))
"""


def test_pod_messages_carry_no_bookkeeping_header(frontal):
    """The worker trusts only the `xapi_*` headers a worker signed (any producer can set
    any header): xapi_celery.py no longer stamps `xapi_first_seen` on Pod's messages, and
    the worker's maximum age counts from a message's first take."""
    result = as_pod_python(frontal, STAMPED)
    assert result.rc == 0, result.stderr
    stamp = json.loads(result.stdout.strip().splitlines()[-1])
    assert stamp is None, stamp


def test_broker_restart_loses_nothing(frontal):
    calls = timed_calls(
        frontal, 6, f"sleep 1; systemctl restart {UNIT}; sleep 2; systemctl restart {UNIT}"
    )
    assert [c for c in calls if c[1] != "ok"] == []
    assert max(took for _, _, took in calls) <= BOUND
    ids = [sid for sid, _, _ in calls]
    assert wait_until(lambda: not missing_from_lrs(frontal, ids), 90), missing_from_lrs(
        frontal, ids
    )


def test_stopped_broker_fails_the_call_quickly(frontal):
    frontal.check_output(f"systemctl stop {UNIT}")
    try:
        calls = timed_calls(frontal, 0)
    finally:
        frontal.check_output(f"systemctl start {UNIT}")
    [(_, outcome, took)] = calls
    assert outcome == "OperationalError" and took <= BOUND, calls


def test_hung_broker_never_holds_a_call_past_the_bound(frontal, encodage):
    pid = frontal.check_output(f"systemctl show -p MainPID --value {UNIT}")
    try:
        calls = timed_calls(frontal, 14, f"sleep 1; kill -STOP {pid}; sleep 10; kill -CONT {pid}")
    finally:
        # The bundled worker does not come back by itself from a broker hung this long: it
        # stays alive and consumes nothing (a liveness defect of the worker, not of Pod's
        # publish, recorded in docs/reliability.md). The later tests need it running.
        frontal.run(f"kill -CONT {pid}")
        encodage.check_output("systemctl restart celeryd-xapi.service")
    slowest = max(took for _, _, took in calls)
    failed = [c for c in calls if c[1] != "ok"]
    assert slowest <= BOUND, f"a call waited {slowest:.2f} s"
    assert failed, "the broker was hung: some calls must have failed"
    assert calls[-1][1] == "ok", "the broker is back: the last call must succeed"
