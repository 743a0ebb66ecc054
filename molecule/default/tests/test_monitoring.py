"""check_xapi and the metrics on the deployed hosts (roles/xapi_ops, docs: "Monitoring").

The check runs as NRPE's `nagios` user (the lab installs Debian's NRPE before the bundle, as a
monitored site has it), in each state an operator must tell apart: healthy, LRS stopped, LRS
credentials refused, dead letters, every worker stopped while statements arrive, the nodes'
spools filling while the LRS is stopped. Then the metrics file the frontal's timer writes is
parsed with prometheus_client's own parser, and its counters are compared with what was
delivered. No password may appear in any output.
"""

from __future__ import annotations

import json
import shlex

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_pipeline import queue_invalid_statement
from xapi_testsupport.pod_on_host import delivered, inventory_vars, produce
from xapi_testsupport.polling import wait_until

PLUGIN = "/usr/lib/nagios/plugins/check_xapi"
CONFIG = "/etc/xapi-monitoring/check_xapi.json"
METRICS = "/var/lib/prometheus/node-exporter/xapi.prom"
WORKER_ENV = "/etc/celeryd-xapi/worker.env"


def secrets() -> list[str]:
    values = inventory_vars()
    return [
        values[name]
        for name in (
            "xapi_broker_password",
            "xapi_broker_producer_password",
            "xapi_broker_monitor_password",
            "xapi_lrs_password",
            "xapi_broker_admin_password",
        )
    ]


def check(host, *args: str, config: str = CONFIG) -> tuple[int, str]:
    """check_xapi as the monitoring user: exit code and its one line."""
    result = host.run(f"runuser -u nagios -- {PLUGIN} -C {config} {' '.join(args)}")
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    for secret in secrets():
        assert secret not in result.stdout + result.stderr
    return result.rc, lines[0]


def perfdata(line: str) -> dict[str, float]:
    """'label'=value[UOM];warn;crit;min; pairs of a status line."""
    values = {}
    for item in line.split(" | ", 1)[1].split():
        label, rest = item.split("=", 1)
        values[label.strip("'")] = float(rest.split(";")[0].rstrip("s%"))
    return values


def altered_config(host, change) -> str:
    """A copy of the check's configuration, changed by `change(config)`, for nagios only."""
    config = json.loads(host.check_output(f"cat {CONFIG}"))
    change(config)
    path = "/etc/xapi-monitoring/altered.json"
    text = shlex.quote(json.dumps(config))
    host.check_output(f"install -o root -g nagios -m 0640 /dev/null {path} && echo {text} > {path}")
    return path


def test_the_check_is_installed_for_the_monitoring_group_only(frontal, encodage) -> None:
    for host in (frontal, encodage):
        plugin, config = host.file(PLUGIN), host.file(CONFIG)
        assert (plugin.user, plugin.group, plugin.mode) == ("root", "root", 0o755)
        assert (config.user, config.group, config.mode) == ("root", "nagios", 0o640)
        assert host.run(f"runuser -u pod -- cat {CONFIG}").rc != 0


def test_healthy(frontal, encodage) -> None:
    # Dead letters the earlier tests left on purpose would make it a WARNING.
    purge = encodage.run(
        f"runuser -u xapi-worker -- env XAPI_WORKER_CONFIG={WORKER_ENV} "
        "/opt/xapi-worker/bin/xapi-worker dead-letters purge --yes"
    )
    assert purge.rc == 0, purge.stdout + purge.stderr
    statement_id = produce(frontal)
    assert delivered(frontal, statement_id)
    for host in (frontal, encodage):
        code, line = check(host)
        assert code == 0 and line.startswith("XAPI OK - queue 0"), line
    assert "LRS HTTP 200" in check(encodage)[1]  # the frontal holds no LRS credentials


def test_nrpe_runs_the_documented_command(encodage) -> None:
    """The NRPE line of the operator guides, in Debian's nrpe.d, asked through check_nrpe."""
    line = f"command[check_xapi]={PLUGIN} -C {CONFIG}"
    encodage.check_output(f"echo {shlex.quote(line)} > /etc/nagios/nrpe.d/xapi.cfg")
    try:
        encodage.check_output("systemctl restart nagios-nrpe-server")
        asked = encodage.run("/usr/lib/nagios/plugins/check_nrpe -H 127.0.0.1 -c check_xapi")
        assert asked.rc == 0 and asked.stdout.startswith("XAPI OK"), asked.stdout + asked.stderr
    finally:
        encodage.run("rm -f /etc/nagios/nrpe.d/xapi.cfg && systemctl restart nagios-nrpe-server")


def test_lrs_stopped(frontal, encodage, lrs) -> None:
    lrs.check_output("systemctl stop ralph-lrs")
    try:
        code, line = check(encodage)
        assert code == 2 and line.startswith("XAPI CRITICAL - LRS unreachable"), line
        assert check(frontal)[0] == 0  # the broker's side is fine
    finally:
        lrs.check_output("systemctl start ralph-lrs")
    assert wait_until(lambda: check(encodage)[0] == 0, 60)


def test_lrs_credentials_refused(encodage) -> None:
    def wrong_password(config: dict) -> None:
        config["lrs"]["password"] = "not-the-lrs-password-0000"

    path = altered_config(encodage, wrong_password)
    try:
        code, line = check(encodage, config=path)
        assert code == 2 and line.startswith("XAPI CRITICAL - LRS credentials refused (HTTP 401)")
        assert "not-the-lrs-password" not in line
    finally:
        encodage.run(f"rm -f {path}")


def test_dead_letters(frontal, encodage) -> None:
    before = json.loads(
        check(encodage, "--metric", "dead_letters")[1].split("'dead_letters'=")[1].split(";")[0]
        or "0"
    )
    statement_id = queue_invalid_statement(frontal)
    assert wait_until(lambda: check(encodage)[0] == 1, 60)
    code, line = check(encodage)
    assert code == 1 and line.startswith("XAPI WARNING - "), line
    assert f"{before + 1} dead letters" in line and "new dead letters" in line, line
    code, line = check(frontal, "--metric", "dead_new", "-w", "1", "-c", "1")
    assert code == 2 and "new dead letters (>= 1)" in line, line
    assert statement_id  # purged by test_pipeline's dead-letter test, which follows


def test_workers_stopped_while_statements_arrive(frontal, encodage) -> None:
    def low_queue_thresholds(config: dict) -> None:
        config["thresholds"]["queue"] = [2, 1000]

    path = altered_config(encodage, low_queue_thresholds)
    encodage.check_output("systemctl stop celeryd-xapi")
    try:
        ids = [produce(frontal) for _ in range(3)]
        code, line = check(encodage, config=path)
        assert code == 2, line
        assert line.startswith(
            "XAPI CRITICAL - statements accumulate while the LRS answers: no worker consumes"
        ), line
        # With the defaults: 0 nodes alive is critical by itself.
        code, line = check(encodage)
        assert code == 2 and "0 worker nodes alive" in line, line
    finally:
        encodage.check_output("systemctl start celeryd-xapi")
        encodage.run(f"rm -f {path}")
    assert all(delivered(frontal, i) for i in ids)
    assert wait_until(lambda: check(encodage)[0] in (0, 1), 60)  # dead letters may remain


def test_spool_filling_while_the_lrs_is_stopped(frontal, encodage, lrs) -> None:
    """The LRS stopped: the worker moves what it cannot deliver into its node's spool, the
    check (the frontal's: the spool state is in its broker) reports it, and the spool drains
    by itself once the LRS is back."""
    before = perfdata(check(frontal)[1])
    if "spool_depth" not in before:
        pytest.skip("the lab's worker nodes run without the spool (no <list>.spool hash)")

    def low_spool_thresholds(config: dict) -> None:
        config["thresholds"]["spool_depth"] = [1, 1000]

    path = altered_config(frontal, low_spool_thresholds)
    lrs.check_output("systemctl stop ralph-lrs")
    try:
        ids = [produce(frontal) for _ in range(5)]

        def spooled() -> bool:
            return perfdata(check(frontal, config=path)[1]).get("spool_depth", 0) > 0

        assert wait_until(spooled, 120), check(frontal, config=path)[1]
        code, line = check(frontal, config=path)
        assert code in (1, 2), line  # 2 only if a node's spool is full
        assert "statements spooled (>= 1)" in line, line
        # With the defaults, a few spooled statements are below the warning (1000).
        code, line = check(frontal)
        assert "spooled" in line and "statements spooled (>=" not in line, line
    finally:
        lrs.check_output("systemctl start ralph-lrs")
        frontal.run(f"rm -f {path}")
    assert wait_until(lambda: perfdata(check(frontal)[1]).get("spool_depth") == 0, 180)
    assert all(delivered(frontal, i) for i in ids)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    for secret in secrets():
        assert secret not in text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metrics(frontal) -> dict[tuple[str, tuple], float]:
    """The frontal's metrics read now, as the timer's service writes them (run directly: a
    `systemctl start` would join a run the timer began earlier, with older readings)."""
    text = frontal.check_output(f"runuser -u nagios -- {PLUGIN} -C {CONFIG} --prometheus -")
    return parse(text)


def test_the_timer_writes_the_metrics_file(frontal) -> None:
    assert frontal.service("xapi-metrics.timer").is_enabled
    assert frontal.service("xapi-metrics.timer").is_running
    frontal.check_output("systemctl start xapi-metrics.service")
    # Written by the unprivileged xapi-metrics user in its own directory; node_exporter's
    # file is root's link to it.
    link = frontal.file(METRICS)
    # The link's own owner: testinfra's File.user follows links (stat -L).
    assert link.is_symlink and frontal.check_output(f"stat -c %U {METRICS}") == "root"
    assert link.linked_to == "/var/lib/xapi-metrics/xapi.prom"
    written = frontal.file(link.linked_to)
    assert (written.user, written.mode) == ("xapi-metrics", 0o644)
    assert frontal.service("xapi-metrics.service").systemd_properties["User"] == "xapi-metrics"
    families = {name for name, _ in parse(written.content_string)}
    assert {"xapi_statements_delivered_total", "xapi_queue_length", "xapi_broker_up"} <= families


def settled_metrics(frontal, broker: tuple) -> dict[tuple[str, tuple], float]:
    """The metrics once nothing is queued or in flight and the delivered counter holds still
    (a batch's counters are added after the LRS answered it)."""
    last: dict[tuple[str, tuple], float] = {}

    def still() -> bool:
        nonlocal last
        now = metrics(frontal)
        key = ("xapi_statements_delivered_total", broker)
        settled = (
            bool(last)
            and now[key] == last[key]
            and now[("xapi_queue_length", broker)] == 0
            and now[("xapi_in_flight", broker)] == 0
        )
        last = now
        return settled

    assert wait_until(still, 60, 3), "the counters did not settle"
    return last


def test_metrics_count_what_was_delivered(frontal, encodage) -> None:
    broker = (("broker", frontal.backend.get_hostname().removeprefix("xapi-lab-")),)
    before = settled_metrics(frontal, broker)
    assert before[("xapi_broker_up", broker)] == 1
    ids = [produce(frontal) for _ in range(5)]
    assert all(delivered(frontal, i) for i in ids)
    after = settled_metrics(frontal, broker)
    key = ("xapi_statements_delivered_total", broker)
    warnings = encodage.run("journalctl -o cat -u 'celeryd-xapi@*' | grep -i 'metrics' | tail -5")
    assert after[key] == before[key] + 5, (before[key], after[key], warnings.stdout)
    # Each batch is one POST: the LRS's answers (200s, the dead-letter test's refusal, the
    # stopped LRS's errors) and the batch-size histogram's count agree.
    posts = sum(
        value
        for (name, labels), value in after.items()
        if name == "xapi_lrs_responses_total" and dict(labels)["broker"] == broker[0][1]
    )
    assert posts == after[("xapi_batch_size_count", broker)]
    assert after[("xapi_lrs_responses_total", (*broker, ("status", "200")))] >= 5
    assert after[("xapi_batch_size_bucket", (*broker, ("le", "+Inf")))] == posts
    assert after[("xapi_worker_nodes_alive", broker)] == 1


@pytest.fixture(autouse=True, scope="module")
def _no_altered_config_left(encodage):
    yield
    encodage.run("rm -f /etc/xapi-monitoring/altered.json")
