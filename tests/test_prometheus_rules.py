"""The Prometheus alert rules (prometheus/xapi.rules.yml): generated from check_xapi's own
thresholds and not stale, valid for `promtool check rules`, and firing as the Nagios check
does under `promtool test rules`, on series shaped like the frontals' textfile (check_xapi's
metric families and labels, as node_exporter serves them with its instance and job).

promtool comes from Debian's prometheus package, unpacked by tools/promtool.sh (no server).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from xapi_testsupport.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "prometheus" / "xapi.rules.yml"


generator = load_script("prometheus_rules", ROOT / "tools" / "prometheus_rules.py")
check_xapi = generator.load_check_xapi()


@pytest.fixture(scope="module")
def promtool() -> str:
    try:
        out = subprocess.run(
            ["bash", str(ROOT / "tools" / "promtool.sh")],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"tools/promtool.sh: {exc.stderr}")
    return out.stdout.strip()


def _rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_rules_file_is_generated_from_check_xapi() -> None:
    assert RULES.read_text() == generator.render(), (
        "prometheus/xapi.rules.yml is stale: python tools/prometheus_rules.py"
    )


def test_thresholds_are_check_xapis() -> None:
    """Each threshold rule compares with check_xapi's default, for both levels."""
    rules = _rules()
    t = check_xapi.DEFAULT_THRESHOLDS
    for alert, name in [
        ("XapiQueueLong", "queue"),
        ("XapiOldestStatementTooOld", "oldest_age"),
        ("XapiInFlightHigh", "in_flight"),
        ("XapiDeadLetters", "dead_letters"),
        ("XapiDeadLettersRising", "dead_new"),
        ("XapiNoDeliveryWhileQueued", "last_delivery_age"),
        ("XapiSpoolDeep", "spool_depth"),
        ("XapiSpoolOld", "spool_age"),
        ("XapiSpoolFilling", "spool_used"),
    ]:
        warn, crit = (generator._num(v) for v in t[name])
        assert f" >= {warn}" in rules[alert + "Warning"]["expr"], alert
        assert f" >= {crit}" in rules[alert + "Critical"]["expr"], alert


def test_role_deploys_check_xapis_thresholds() -> None:
    """The thresholds roles/xapi_ops deploys (vars/main.yml) are check_xapi's defaults, those
    of the rules: `nodes` aside, which the role derives from the inventory's node count."""
    role = yaml.safe_load((ROOT / "roles" / "xapi_ops" / "vars" / "main.yml").read_text())
    deployed = role["xapi_ops_check_threshold_defaults"]
    expected = {k: list(v) for k, v in check_xapi.DEFAULT_THRESHOLDS.items() if k != "nodes"}
    assert {k: v for k, v in deployed.items() if k != "nodes"} == expected
    assert "min" in deployed["nodes"][1]  # critical below min(node count, 1): the rules' < 1


def test_rules_use_only_the_textfiles_metrics() -> None:
    """Every xapi_* name in the rules is one check_xapi writes (a renamed family breaks it)."""
    families = {f[0] for f in check_xapi.GAUGES.values()}
    families |= {f[0] for f in check_xapi.SPOOL_GAUGES.values()}
    families |= {f[0] for f in check_xapi.COUNTER_FIELDS.values()}
    families.add(check_xapi.RESPONSES[0])
    used = set(re.findall(r"\bxapi_[a-z_]+", "".join(r["expr"] for r in _rules().values())))
    assert used and used <= families, used - families


def test_promtool_check_rules(promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- promtool test rules ---------------------------------------------------------------------
# Series as node_exporter serves the frontal's xapi.prom: check_xapi's labels (broker; node
# for the spools; status for the LRS's answers) and the scrape's instance and job.
SCRAPE = 'instance="frontal1:9100",job="node"'
B = f'broker="frontal1",{SCRAPE}'
N = f'broker="frontal1",node="xapi",{SCRAPE}'
LABELS = {"broker": "frontal1", "instance": "frontal1:9100", "job": "node"}
HEALTHY = {
    f"xapi_broker_up{{{B}}}": "1x20",
    f"xapi_queue_length{{{B}}}": "3x20",
    f"xapi_oldest_queued_age_seconds{{{B}}}": "2x20",
    f"xapi_in_flight{{{B}}}": "10x20",
    f"xapi_worker_nodes_alive{{{B}}}": "1x20",
    f"xapi_dead_letters{{{B}}}": "0x20",
    f"xapi_statements_dead_lettered_total{{{B}}}": "0x20",
    # a delivery every minute (eval time 15m: 60 s ago)
    f"xapi_last_delivery_timestamp_seconds{{{B}}}": "0+60x20",
    f'xapi_lrs_responses_total{{{B},status="200"}}': "0+10x20",
    f"xapi_spool_depth{{{N}}}": "0x20",
    f"xapi_spool_oldest_age_seconds{{{N}}}": "0x20",
    f"xapi_spool_bytes{{{N}}}": "4096x20",
    f"xapi_spool_max_bytes{{{N}}}": "1073741824x20",
    f"xapi_spool_full{{{N}}}": "0x20",
    f"xapi_spool_damaged{{{N}}}": "0x20",
    'node_textfile_mtime_seconds{file="/var/lib/prometheus/node-exporter/xapi.prom",'
    f"{SCRAPE}}}": "0+60x20",
    f"node_textfile_scrape_error{{{SCRAPE}}}": "0x20",
}
# Every series gone after 4 min (the frontal's node_exporter stopped).
GONE = {name: re.sub(r"x20$", "x4", values) for name, values in HEALTHY.items()}

# (what, series replacing the healthy ones, {alert: [(extra labels, $value)]}); evaluated at
# 15 min (every rule's `for` has passed), every alert of the rules file checked: those not
# named must not fire.
CASES: list[tuple[str, dict[str, str], dict[str, list[tuple[dict[str, str], str]]]]] = [
    ("healthy", {}, {}),
    (
        "queue long, oldest too old, no delivery while queued",
        {
            f"xapi_queue_length{{{B}}}": "1500x20",
            f"xapi_oldest_queued_age_seconds{{{B}}}": "2000x20",
            f"xapi_last_delivery_timestamp_seconds{{{B}}}": "0x20",
        },
        {
            "XapiQueueLongWarning": [({}, "1500")],
            "XapiOldestStatementTooOldWarning": [({}, "2000")],
            "XapiOldestStatementTooOldCritical": [({}, "2000")],
            "XapiNoDeliveryWhileQueuedWarning": [({}, "900")],
        },
    ),
    (
        "no worker consuming",
        {
            f"xapi_queue_length{{{B}}}": "2000x20",
            f"xapi_worker_nodes_alive{{{B}}}": "0x20",
        },
        {
            "XapiNoWorkerConsuming": [({}, "0")],
            "XapiWorkerNodesMissing": [({}, "0")],
            "XapiQueueLongWarning": [({}, "2000")],
        },
    ),
    (
        "spool filling, then full",
        {
            f"xapi_spool_depth{{{N}}}": "5000x20",
            f"xapi_spool_oldest_age_seconds{{{N}}}": "1000x20",
            f"xapi_spool_bytes{{{N}}}": "95x20",
            f"xapi_spool_max_bytes{{{N}}}": "100x20",
            f"xapi_spool_full{{{N}}}": "1x20",
        },
        {
            "XapiSpoolDeepWarning": [({}, "5000")],
            "XapiSpoolOldWarning": [({"node": "xapi"}, "1000")],
            "XapiSpoolFillingWarning": [({"node": "xapi"}, "95")],
            "XapiSpoolFillingCritical": [({"node": "xapi"}, "95")],
            "XapiSpoolFull": [({"node": "xapi"}, "1")],
        },
    ),
    (
        "dead letters rising, the LRS refusing the credentials then failing",
        {
            f"xapi_dead_letters{{{B}}}": "0 0 0 0 0 0 0 0 0 0 5 5 5 5 5 5 5 5 5 5 5",
            f"xapi_statements_dead_lettered_total{{{B}}}": "0 0 0 0 0 0 0 0 0 0 5 5 5 5 5 5",
            f'xapi_lrs_responses_total{{{B},status="200"}}': "0+10x5 50x15",
            f'xapi_lrs_responses_total{{{B},status="401"}}': "0x5 0+4x15",
        },
        {
            "XapiDeadLettersWarning": [({}, "5")],
            "XapiDeadLettersRisingWarning": [({}, "5")],
            "XapiLrsCredentialsRefused": [({"status": "401"}, "40")],
            "XapiLrsFailing": [({}, "40")],
        },
    ),
    (
        "dead letters purged after they rose: nothing rising any more",
        {
            f"xapi_dead_letters{{{B}}}": "0 0 0 0 0 0 0 0 0 0 5 5 0 0 0 0 0 0 0 0 0",
            f"xapi_statements_dead_lettered_total{{{B}}}": "0 0 0 0 0 0 0 0 0 0 5 5 5 5 5 5",
        },
        {},
    ),
    ("metrics gone", GONE, {"XapiMetricsAbsent": [({}, "1")]}),
    (
        "node_exporter cannot parse a textfile",
        {f"node_textfile_scrape_error{{{SCRAPE}}}": "1x20"},
        {"XapiMetricsUnreadable": [({}, "1")]},
    ),
    (
        "broker down, metrics stale",
        {
            f"xapi_broker_up{{{B}}}": "1x5 0x15",
            'node_textfile_mtime_seconds{file="/var/lib/prometheus/node-exporter/xapi.prom",'
            f"{SCRAPE}}}": "0x20",
        },
        {
            "XapiBrokerDown": [({}, "0")],
            "XapiMetricsStale": [({"file": "/var/lib/prometheus/node-exporter/xapi.prom"}, "900")],
        },
    ),
]


def _expand(template: str, labels: dict[str, str], value: str) -> str:
    """The rules' annotations use only {{ $labels.NAME }} and {{ $value }}."""
    out = template.replace("{{ $value }}", value)
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), out)


def _unittest(tmp_path: Path) -> Path:
    rules = _rules()
    tests = []
    for what, series, expected in CASES:
        assert set(expected) <= set(rules), what
        inputs = {**HEALTHY, **series}
        alert_cases = []
        for alert, rule in rules.items():
            exp = []
            for extra, value in expected.get(alert, []):
                labels = dict(LABELS)
                if alert in ("XapiMetricsStale", "XapiMetricsUnreadable"):
                    labels.pop("broker")
                if alert == "XapiMetricsAbsent":  # absent_over_time: no labels to keep
                    labels = {}
                labels.update(extra)
                exp.append(
                    {
                        "exp_labels": {**labels, **rule["labels"]},
                        "exp_annotations": {
                            k: _expand(v, labels, value) for k, v in rule["annotations"].items()
                        },
                    }
                )
            alert_cases.append({"eval_time": "15m", "alertname": alert, "exp_alerts": exp})
        tests.append(
            {
                "name": what,
                "interval": "1m",
                "input_series": [{"series": k, "values": v} for k, v in inputs.items()],
                "alert_rule_test": alert_cases,
            }
        )
    path = tmp_path / "xapi.rules.test.yml"
    path.write_text(
        yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests})
    )
    return path


def test_promtool_test_rules(promtool: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [promtool, "test", "rules", str(_unittest(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def test_series_are_shaped_like_the_textfile() -> None:
    """The test's series use check_xapi's families and labels only (plus the scrape's)."""
    families = {f[0] for f in check_xapi.GAUGES.values()}
    families |= {f[0] for f in check_xapi.SPOOL_GAUGES.values()}
    families |= {f[0] for f in check_xapi.COUNTER_FIELDS.values()}
    families.add(check_xapi.RESPONSES[0])
    for _, series, _ in CASES:
        for name in {**HEALTHY, **series}:
            metric, labels = name.split("{", 1)
            keys = set(re.findall(r"(\w+)=", labels))
            if metric == "node_textfile_mtime_seconds":  # node_exporter's own
                assert keys == {"file", "instance", "job"}
                continue
            if metric == "node_textfile_scrape_error":  # node_exporter's own
                assert keys == {"instance", "job"}
                continue
            assert metric in families, metric
            assert keys <= {"broker", "node", "status", "instance", "job"}, name
