"""The worker on hosts of its own group, xapi_worker (issue 32, item 4): the encoding host, the
first frontal (consuming its own instance over loopback) and the LRS host, a dedicated worker
host where Pod neither encodes nor serves: no Pod code, user, venv or checkout is installed
there, and the worker alone, on each of those hosts in turn, delivers the statements of both
frontals."""

from __future__ import annotations

import pytest
from conftest import FRONTALS, host
from xapi_testsupport.pod_on_host import delivered, produce
from xapi_testsupport.polling import wait_until
from xapi_testsupport.worker_on_host import WORKER

WORKER_HOSTS = ["multi-encodage", "multi-frontal1", "multi-lrs"]
NODES = ["xapi-1", "xapi-2"]
POD_PATHS = [
    "/usr/local/django_projects",
    "/home/pod",
    "/etc/ansible/facts.d/xapi_pod.fact",
    "/usr/local/lib/xapi-worker/constraints.txt",
]


def test_no_pod_on_the_dedicated_worker_host():
    lrs = host("multi-lrs")
    assert not lrs.user("pod").exists
    assert not lrs.group("pod").exists
    for path in POD_PATHS:
        assert not lrs.file(path).exists, path
    assert lrs.user(WORKER).exists
    assert lrs.user(WORKER).shell == "/usr/sbin/nologin"


def test_pod_left_alone_on_the_frontal_worker_host():
    """The frontal's Pod is the operator's: the worker's role installs none of Pod there."""
    frontal = host("multi-frontal1")
    assert not frontal.file("/etc/ansible/facts.d/xapi_pod.fact").exists
    settings = frontal.file(
        "/usr/local/django_projects/podv4/pod/custom/settings_local.py"
    ).content_string
    # The frontal's own block (the producer's URL), not the worker's credentials.
    assert "xapi-producer:" in settings and "XAPI_LRS_PWD" not in settings


@pytest.mark.parametrize("name", WORKER_HOSTS)
def test_every_worker_host_runs_a_node_per_broker_as_the_workers_user(name):
    worker = host(name)
    for node in NODES:
        unit = f"celeryd-xapi@{node}.service"
        assert worker.service(unit).is_running, unit
        pid = worker.check_output(f"systemctl show -p MainPID --value {unit}").strip()
        assert worker.check_output(f"ps -o user= -p {pid}").strip() == WORKER


def test_the_frontal_consumes_its_own_instance_over_loopback():
    frontal = host("multi-frontal1")
    own = frontal.file("/etc/celeryd-xapi/broker-xapi-1.env").content_string
    other = frontal.file("/etc/celeryd-xapi/broker-xapi-2.env").content_string
    assert "@127.0.0.1:6380/" in own and "rediss://" in own
    assert f"@{FRONTALS[1]}:6380/" in other


@pytest.mark.parametrize("name", WORKER_HOSTS)
def test_each_worker_host_alone_delivers_both_frontals(name):
    others = [host(h) for h in WORKER_HOSTS if h != name]
    for other in others:
        other.check_output("systemctl stop celeryd-xapi")
    try:
        sent = [(frontal, produce(frontal)) for frontal in map(host, FRONTALS)]
        assert all(delivered(frontal, statement) for frontal, statement in sent)
    finally:
        for other in others:
            other.run("systemctl start celeryd-xapi")
    for other in others:
        assert wait_until(
            lambda o=other: o.run("systemctl is-active celeryd-xapi@xapi-1").rc == 0, 30
        )
