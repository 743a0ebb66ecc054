"""The first rule: the bundle changes what belongs to the xAPI pipeline, nothing else.

lab/prepare.yml makes the frontal a Pod frontal as Pod's docs make it: Debian's redis-server
with its default configuration, password-less, holding Pod's select2 cache (db 2), cache
(db 3), sessions (db 4) and a queued encoding task (db 5), used by a stand-in for Pod's
uWSGI on every page view; then it snapshots that site. Here, after site.yml and its second
run, the same site must be found: configuration byte for byte, processes not restarted,
keys intact, clients without a password still served.
"""

from __future__ import annotations

import json

import pytest
from xapi_testsupport.pod_on_host import POD_DIR, as_pod, site_snapshots

POD_DBS = (2, 3, 4, 5)


@pytest.fixture(scope="module")
def frontal_snapshots(frontal) -> tuple[dict, dict]:
    return site_snapshots(frontal)


def test_pod_redis_configuration_byte_for_byte(frontal_snapshots):
    before, now = frontal_snapshots
    assert before["files"]["/etc/redis/redis.conf"] is not None
    assert now["files"] == before["files"]


def test_pod_redis_never_restarted(frontal_snapshots):
    before, now = frontal_snapshots
    service = "redis-server.service"
    assert before["services"][service]["ActiveState"] == "active"
    assert now["services"][service] == before["services"][service]


def test_pod_web_service_still_running(frontal_snapshots):
    """Restarted once, by the frontal role's handler, so that Pod reads its new xAPI
    settings; running now."""
    _, now = frontal_snapshots
    assert now["services"]["uwsgi-pod.service"]["ActiveState"] == "active"


def test_pod_data_intact(frontal_snapshots):
    before, now = frontal_snapshots
    # The lab's site has data in every one of Pod's databases, the encoding task included.
    assert all(before["redis"][str(db)] for db in POD_DBS)
    assert now["redis"] == before["redis"]


@pytest.mark.parametrize("db", POD_DBS)
def test_password_less_clients_still_served(frontal, db):
    cli = f"redis-cli -n {db}"
    out = frontal.check_output(
        f"{cli} SET lab-test:rule-one x EX 60 && {cli} GET lab-test:rule-one"
        f" && {cli} DEL lab-test:rule-one"
    )
    assert out.split() == ["OK", "x", "1"]


def test_pod_pages_still_served_with_their_session(frontal):
    page = frontal.check_output(
        "/usr/bin/python3 -c 'import urllib.request; "
        'print(urllib.request.urlopen("http://127.0.0.1:8000/", timeout=5).read().decode())\''
    )
    assert json.loads(page)["session"] is True


def test_no_xapi_key_in_pod_redis(frontal):
    """Nothing of the pipeline goes to Pod's Redis: its db 6 stays empty."""
    assert frontal.check_output("redis-cli -n 6 DBSIZE") == "0"


def test_pod_redis_keeps_its_port_and_the_instance_its_own(frontal):
    listening = frontal.check_output("ss -Hltnp")
    pod_redis = [line for line in listening.splitlines() if ":6379 " in line]
    assert pod_redis and all("redis-server" in line for line in pod_redis)
    main_pid = frontal.check_output("systemctl show -p MainPID --value redis-server")
    assert all(f"pid={main_pid}," in line for line in pod_redis)


@pytest.fixture(scope="module")
def encodage_snapshots(encodage) -> tuple[dict, dict]:
    return site_snapshots(encodage)


def test_pod_encoding_worker_untouched(encodage_snapshots):
    """The encoding host runs Pod's encoding worker as Pod's remote-encoding doc sets it up
    (/etc/init.d/celeryd, CELERY_APP="pod.main"): its files byte for byte, its processes
    (pid and start time) the same: never restarted."""
    before, now = encodage_snapshots
    assert before["files"]["/etc/default/celeryd"] and before["files"]["/etc/init.d/celeryd"]
    assert before["pod_workers"], "the lab's encoding host runs no encoding worker"
    assert now["files"] == before["files"]
    assert now["services"] == before["services"]
    assert now["pod_workers"] == before["pod_workers"]


def test_pod_venv_untouched_by_the_bundled_worker(encodage_snapshots):
    """The bundled worker has a venv of its own: Pod's venv keeps every package as it was (the
    lab's operator had fixed kombu by hand, so not even the kombu pin changes it)."""
    before, now = encodage_snapshots
    assert before["pod_venv"] and now["pod_venv"] == before["pod_venv"]
    assert not [
        p for p in now["pod_venv"] if p.lower().startswith(("xapi-worker", "celery-batches"))
    ]


def test_pod_checkout_and_venv_unchanged_on_a_current_release(encodage_snapshots, encodage):
    """The encoding host runs Pod 4.4.0 before the bundle (lab/prepare.yml): site.yml, whose
    inventory names 4.4.0 for fresh hosts only, leaves its checkout at its commit and every
    package of its venv as it was (issue 32: an earlier release moved it back to 4.1.0)."""
    before, now = encodage_snapshots
    tag = as_pod(encodage, f"git -C {POD_DIR} describe --tags --exact-match")
    assert tag.stdout.strip() == "4.4.0", tag.stderr
    assert before["pod_checkout"] and now["pod_checkout"] == before["pod_checkout"]
    assert before["pod_venv"] and now["pod_venv"] == before["pod_venv"]
    assert "requests==2.34.2" in now["pod_venv"]


def test_frontal_pod_venv_changed_only_in_kombu(frontal_snapshots):
    """Pod's pins win on the frontal: a fresh install of Pod 4.4.0's requirements resolved
    kombu 5.7 (the drift); the bundle changed kombu and nothing else."""
    before, now = frontal_snapshots

    def without_kombu(freeze: list[str]) -> list[str]:
        return [p for p in freeze if not p.lower().startswith("kombu==")]

    assert before["pod_venv"] and without_kombu(now["pod_venv"]) == without_kombu(
        before["pod_venv"]
    )
    assert "kombu==5.5.4" in now["pod_venv"] and "kombu==5.5.4" not in before["pod_venv"]
    assert "requests==2.34.2" in now["pod_venv"]


def test_encoding_in_progress_goes_on(encodage):
    log = encodage.file("/var/log/celery/worker1.log").content_string
    assert "encoding video 42" in log and "encoded video" not in log
