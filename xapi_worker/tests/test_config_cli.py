"""Settings errors stop the worker with a message naming the setting; ``xapi-worker check``."""

from __future__ import annotations

import json
import subprocess

from support import LRS_PASSWORD, VENV_BIN, free_port, run_cli, worker_env, write_config


def _celery(config, extra=None):
    return subprocess.run(
        [str(VENV_BIN / "celery"), "-A", "xapi_worker.app", "worker", "-Q", "xapi", "-l", "INFO"],
        env=worker_env(config, extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _base(tmp_path, **values):
    data = {
        "XAPI_LRS_URL": "http://127.0.0.1:9/xAPI/statements/",
        "XAPI_LRS_LOGIN": "u",
        "XAPI_LRS_PWD": LRS_PASSWORD,
        "XAPI_CELERY_BROKER_URL": "redis://:brokerpw@127.0.0.1:1/6",
    }
    data.update(values)
    return write_config(tmp_path / "w.env", {k: v for k, v in data.items() if v is not None})


def test_missing_setting_stops_worker(tmp_path):
    result = _celery(_base(tmp_path, XAPI_LRS_URL=None))
    assert result.returncode == 3
    assert "XAPI_LRS_URL is not set" in result.stderr


def test_malformed_setting_stops_worker(tmp_path):
    result = _celery(_base(tmp_path), {"XAPI_WORKER_BATCH_SIZE": "many"})
    assert result.returncode == 3
    assert "XAPI_WORKER_BATCH_SIZE" in result.stderr
    assert LRS_PASSWORD not in result.stderr + result.stdout
    assert "brokerpw" not in result.stderr + result.stdout
    cli = run_cli(_base(tmp_path), "check", extra={"XAPI_CELERY_BROKER_URL": "amqp://x/"})
    assert cli.returncode == 3 and "XAPI_CELERY_BROKER_URL" in cli.stderr


def test_settings_masks_secrets(tmp_path):
    result = run_cli(_base(tmp_path), "settings")
    assert result.returncode == 0
    view = json.loads(result.stdout)
    assert view["XAPI_LRS_PWD"] == "****"
    assert view["XAPI_CELERY_BROKER_URL"] == "redis://:****@127.0.0.1:1/6"
    assert LRS_PASSWORD not in result.stdout and "brokerpw" not in result.stdout


def test_check_exit_codes(tmp_path, redis_srv, ralph, make_config):
    ok = run_cli(make_config(ralph.url), "check")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("OK ") == 2
    bad_pw = run_cli(make_config(ralph.url, XAPI_LRS_PWD="nope"), "check")
    assert bad_pw.returncode == 7 and "XAPI_LRS_LOGIN/XAPI_LRS_PWD" in bad_pw.stderr
    down = f"http://127.0.0.1:{free_port()}/xAPI/statements/"
    lrs_down = run_cli(make_config(down), "check")
    assert lrs_down.returncode == 6 and "unreachable" in lrs_down.stderr
    wrong_path = run_cli(make_config(ralph.url.replace("xAPI", "nowhere")), "check")
    assert wrong_path.returncode == 8
    broker_down = f"redis://127.0.0.1:{free_port()}/6"
    bd = run_cli(make_config(ralph.url, XAPI_CELERY_BROKER_URL=broker_down), "check")
    assert bd.returncode == 4 and "XAPI_CELERY_BROKER_URL" in bd.stderr
    redis_srv.client().config_set("requirepass", "brokerpw")
    auth = f"redis://:wrongpw@127.0.0.1:{redis_srv.port}/6"
    ba = run_cli(make_config(ralph.url, XAPI_CELERY_BROKER_URL=auth), "check")
    assert ba.returncode == 5 and "wrongpw" not in ba.stderr + ba.stdout


def test_check_masks_an_answer_that_echoes_the_password(tmp_path, redis_srv, ralph, make_config):
    """`check` used to print the LRS's answer as it came: a proxy page echoing the request's
    credentials showed the password."""
    from urllib.parse import quote

    from support import Proxy

    def respond(req):
        body = f"<html>login={LRS_PASSWORD} again={quote(LRS_PASSWORD)} path={req.path}</html>"
        return 502, {"Content-Type": "text/html"}, body.encode()

    proxy = Proxy(upstream_port=ralph.port, respond=respond).start()
    try:
        result = run_cli(make_config(proxy.url), "check")
    finally:
        proxy.stop()
    assert result.returncode == 8, result.stderr
    assert "HTTP 502" in result.stderr and "****" in result.stderr
    assert LRS_PASSWORD not in result.stdout + result.stderr
    assert quote(LRS_PASSWORD) not in result.stdout + result.stderr


def test_status_field_and_queue_length_agree(tmp_path, redis_srv, make_config):
    redis_srv.client().lpush("xapi", b"x", b"y")
    config = make_config("http://127.0.0.1:9/xAPI/statements/")
    assert run_cli(config, "status", "--field", "queue").stdout.strip() == "2"
    assert run_cli(config, "queue-length").stdout.strip() == "2"
    assert json.loads(run_cli(config, "status").stdout)["queue"] == 2


def test_a_spool_limit_under_four_of_the_largest_batches_stops_worker(tmp_path):
    """The spool counts as full with less room than one batch of the largest statements: a
    smaller limit than four such batches would be full before it held a few."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    config = _base(tmp_path, XAPI_WORKER_SPOOL_DIR=str(spool), XAPI_WORKER_SPOOL_MAX_MB="64")
    result = _celery(config)
    assert result.returncode == 3
    assert (
        "XAPI_WORKER_SPOOL_MAX_MB must be 0 (automatic) or at least 104 with "
        "XAPI_WORKER_BATCH_SIZE=100" in result.stderr
    )
    smaller = _celery(config, {"XAPI_WORKER_BATCH_SIZE": "50", "XAPI_WORKER_SPOOL_MAX_MB": "40"})
    assert smaller.returncode == 3 and "at least 52 with" in smaller.stderr


def test_a_spool_limit_the_dead_letters_alone_can_fill_stops_worker(tmp_path):
    """The spool's limit covers its file, dead letters included: 200 MiB (four batches of
    the largest statements, and more) beside the default 512 MiB of dead letters let the
    dead letters make the spool full, the node stop taking with a hint about the LRS, and
    the dead letters' own limit (and its CRITICAL) never be met."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    config = _base(tmp_path, XAPI_WORKER_SPOOL_DIR=str(spool), XAPI_WORKER_SPOOL_MAX_MB="200")
    result = _celery(config)
    assert result.returncode == 3, result.stderr[-2000:]
    assert (
        "XAPI_WORKER_SPOOL_MAX_MB must be 0 (automatic) or at least 616: "
        "XAPI_WORKER_DEAD_LETTER_MAX_MB (512)" in result.stderr
    )
    assert run_cli(config, "settings").returncode == 3
    # the dead letters' limit lowered to fit: taken
    fits = run_cli(config, "settings", extra={"XAPI_WORKER_DEAD_LETTER_MAX_MB": "96"})
    assert fits.returncode == 0, fits.stderr
    assert json.loads(fits.stdout)["XAPI_WORKER_SPOOL_MAX_MB"] == 200


def test_the_retry_after_cap_is_a_setting_within_its_bounds(tmp_path):
    """XAPI_WORKER_RETRY_AFTER_MAX_SECONDS: the longest Retry-After honoured, 1 s to a day."""
    config = _base(tmp_path)
    default = run_cli(config, "settings")
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout)["XAPI_WORKER_RETRY_AFTER_MAX_SECONDS"] == 3600.0
    for bad in ("0.5", "86401", "soon"):
        result = run_cli(config, "settings", extra={"XAPI_WORKER_RETRY_AFTER_MAX_SECONDS": bad})
        assert result.returncode == 3, (bad, result.stderr)
        assert "XAPI_WORKER_RETRY_AFTER_MAX_SECONDS" in result.stderr
    set_ = run_cli(config, "settings", extra={"XAPI_WORKER_RETRY_AFTER_MAX_SECONDS": "600"})
    assert json.loads(set_.stdout)["XAPI_WORKER_RETRY_AFTER_MAX_SECONDS"] == 600.0
