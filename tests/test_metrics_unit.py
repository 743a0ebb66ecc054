"""xapi-metrics.service (roles/xapi_ops) runs check_xapi as an unprivileged user of the
monitoring group, never root (security review, round two, finding 4), writes only its own
state directory, and its `systemd-analyze security --offline` exposure stays at most what it
was as root. check_xapi sets the metrics file's mode on its descriptor, not by path."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles" / "xapi_ops"
# Measured offline on Debian 12's systemd 252, the unit as it ran as root: 2.2.
MAX_EXPOSURE = 2.2


def render() -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLE / "templates"),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 (a unit file, not HTML)
    )
    env.filters["dirname"] = os.path.dirname
    env.filters["basename"] = os.path.basename
    values = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    values["ansible_managed"] = "test"
    state = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["xapi_ops_metrics_state_dir"]
    values["xapi_ops_metrics_state_dir"] = state
    return env.get_template("xapi-metrics.service.j2").render(**values)


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_runs_as_the_metrics_user_of_the_monitoring_group() -> None:
    unit = directives(render())
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert unit.get("User") == [defaults["xapi_ops_metrics_user"]]
    assert unit["User"] != ["root"]
    assert unit.get("Group") == [defaults["xapi_ops_check_group"]]
    # It writes its own state directory only: not the textfile directory, which is root's
    # or node_exporter's.
    assert "ReadWritePaths" not in unit
    assert unit.get("StateDirectory") == ["xapi-metrics"]
    assert "CapabilityBoundingSet" in unit and unit["CapabilityBoundingSet"] == [""]


def test_check_xapi_sets_the_mode_on_the_descriptor() -> None:
    source = (ROOT / "xapi_worker/src/xapi_worker/check/prometheus.py").read_text()
    assert not re.search(r"\bos\.chmod\(", source)
    assert "os.fchmod(" in source


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_unit_exposure_is_no_higher_than_as_root(tmp_path: Path) -> None:
    path = tmp_path / "xapi-metrics.service"
    path.write_text(render())
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    print(f"xapi-metrics.service offline exposure: {match.group(1)}")
    assert float(match.group(1)) <= MAX_EXPOSURE
