"""The worker's units are sandboxed (security review point 9): the template renders the system
call filter, the process view, RemoveIPC, the IP allow list, and its exposure as scored by
`systemd-analyze security --offline` stays at the measured value.

Rendered with the role's own templates and Jinja (the few Ansible filters they use added);
molecule/default/tests/test_unit_hardening.py checks the deployed units on a real host.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
from ansible.module_utils.parsing.convert_bool import boolean

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles" / "xapi_encodage"

# The collection's filter plugin (esup.pod_xapi.xapi_encodage_*), loaded from its file:
# Ansible finds it by directory, not as a package, and putting that directory on sys.path
# would leak it into every other test.
_SPEC = importlib.util.spec_from_file_location(
    "ip_prefixes", ROOT / "plugins" / "filter" / "ip_prefixes.py"
)
assert _SPEC is not None and _SPEC.loader is not None
ip_prefixes = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ip_prefixes)

# Measured offline on Debian 12's systemd 252 (roles/xapi_encodage README, "Sandbox"): the
# node unit was 3.3 before this hardening (3.1 on a running host), the group unit 9.6. With
# the worker run as Pod's user (before its own user): 1.2 bundled worker, 1.3 Pod's app,
# 1.3 without the IP filter, 1.2 without the spool; none may score worse now.
NODE_MAX_EXPOSURE = {"bundled-worker": 1.2, "pod-app": 1.3, "no-ip-filter": 1.3, "no-spool": 1.2}
GROUP_MAX_EXPOSURE = 0.4


def render(template: str, **overrides: object) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLE / "templates"),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        # A unit file, not HTML: Ansible's template module does not escape either.
        autoescape=False,  # noqa: S701
    )
    env.filters["bool"] = boolean
    # Ansible's `match` test: re.match from the start of the value.
    env.tests["match"] = lambda value, pattern: re.match(pattern, str(value)) is not None
    values = {
        "ansible_managed": "test",
        "xapi_encodage_pod_user": "pod",
        "xapi_encodage_pod_group": "pod",
        "xapi_encodage_pod_dir": "/usr/local/django_projects/podv4",
        "xapi_encodage_broker_env_dir": "/etc/celeryd-xapi",
        "xapi_encodage_celery_bin": "/opt/xapi-worker/bin/celery",
        "xapi_encodage_worker_app": "xapi_worker",
        "xapi_encodage_worker_watchdog_sec": 60,
        "xapi_encodage_worker_ip_filter": True,
        "xapi_encodage_worker_ip_allow": ["10.89.0.5", "10.89.0.7", "2001:db8::5"],
        "xapi_encodage_spool_dir": "/var/lib/celeryd-xapi/spool",
        "xapi_encodage_worker_user": "xapi-worker",
        "xapi_encodage_worker_group": "xapi-worker",
        "xapi_encodage_worker_venv": "/opt/xapi-worker",
    }
    values.update(overrides)
    # As vars/main.yml decides them: the spool is the bundled worker's only, which runs as its
    # own user from its venv; Pod's app as Pod's user from Pod's tree.
    bundled = values["xapi_encodage_worker_app"] == "xapi_worker"
    values.setdefault("xapi_encodage_spool_on", bundled)
    who = "worker" if bundled else "pod"
    values.setdefault("xapi_encodage_run_user", values[f"xapi_encodage_{who}_user"])
    values.setdefault("xapi_encodage_run_group", values[f"xapi_encodage_{who}_group"])
    values.setdefault(
        "xapi_encodage_run_dir",
        values["xapi_encodage_worker_venv"] if bundled else values["xapi_encodage_pod_dir"],
    )
    return env.get_template(template).render(**values)


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("app", ["xapi_worker", "pod"])
def test_node_unit_has_the_reviewed_directives(app: str) -> None:
    unit = directives(render("celeryd-xapi@.service.j2", xapi_encodage_worker_app=app))
    assert unit["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert unit["SystemCallErrorNumber"] == ["EPERM"]
    assert unit["ProtectProc"] == ["invisible"]
    assert unit["ProcSubset"] == ["pid"]
    assert unit["RemoveIPC"] == ["true"]
    assert unit["PrivateUsers"] == ["true"]
    assert unit["UMask"] == ["0077"]
    assert unit["IPAddressDeny"] == ["any"]
    assert unit["IPAddressAllow"] == ["localhost 10.89.0.5 10.89.0.7 2001:db8::5"]
    # Run end to end under it with the bundled worker only (README, "Sandbox").
    assert unit.get("MemoryDenyWriteExecute") == (["true"] if app == "xapi_worker" else None)
    # Its spool is the one writable path, and only the bundled worker has one.
    spool = ["/var/lib/celeryd-xapi/spool"]
    assert unit.get("ReadWritePaths") == (spool if app == "xapi_worker" else None)


@pytest.mark.parametrize("unit_file", ["celeryd-xapi@.service.j2", "celeryd-xapi.service.j2"])
def test_bundled_worker_runs_as_its_own_user_from_its_venv(unit_file: str) -> None:
    """Security review 2 (round two): not as pod, and not from Pod's directory, which pod can
    write and `celery -A` imports from first."""
    unit = directives(render(unit_file))
    assert unit["User"] == ["xapi-worker"] and unit["Group"] == ["xapi-worker"]
    if unit_file == "celeryd-xapi@.service.j2":
        assert unit["WorkingDirectory"] == ["/opt/xapi-worker"]
        assert unit["ProtectHome"] == ["true"]
    pod = directives(render(unit_file, xapi_encodage_worker_app="pod"))
    assert pod["User"] == ["pod"]
    if unit_file == "celeryd-xapi@.service.j2":
        assert pod["WorkingDirectory"] == ["/usr/local/django_projects/podv4"]
        assert pod["ProtectHome"] == ["read-only"]


def test_node_unit_is_ordered_after_its_group() -> None:
    """PartOf= alone leaves the stops unordered: `systemctl stop celeryd-xapi` returned while
    the nodes were still in their warm shutdown (molecule/default's every-worker-stopped
    check saw a node still taking). After= the group makes that stop wait for every node."""
    unit = directives(render("celeryd-xapi@.service.j2"))
    assert unit["PartOf"] == ["celeryd-xapi.service"]
    assert "celeryd-xapi.service" in " ".join(unit["After"]).split()


def test_ip_filter_can_be_switched_off() -> None:
    unit = directives(render("celeryd-xapi@.service.j2", xapi_encodage_worker_ip_filter=False))
    assert "IPAddressDeny" not in unit and "IPAddressAllow" not in unit
    # The rest of the sandbox stays.
    assert unit["SystemCallFilter"][0] == "@system-service"


def test_allow_list_with_only_loopback() -> None:
    unit = directives(render("celeryd-xapi@.service.j2", xapi_encodage_worker_ip_allow=[]))
    assert unit["IPAddressAllow"] == ["localhost"]


def exposure(tmp_path: Path, name: str, text: str) -> float:
    path = tmp_path / name
    path.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed here"
)


@needs_analyze
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"xapi_encodage_worker_app": "pod"},
        {"xapi_encodage_worker_ip_filter": False},
        {"xapi_encodage_spool_on": False},
    ],
    ids=["bundled-worker", "pod-app", "no-ip-filter", "no-spool"],
)
def test_node_unit_exposure(
    tmp_path: Path, overrides: dict, request: pytest.FixtureRequest
) -> None:
    score = exposure(
        tmp_path, "celeryd-xapi@xapi.service", render("celeryd-xapi@.service.j2", **overrides)
    )
    print(f"celeryd-xapi@xapi.service offline exposure: {score}")
    assert score <= NODE_MAX_EXPOSURE[request.node.callspec.id]


@needs_analyze
def test_group_unit_exposure(tmp_path: Path) -> None:
    score = exposure(tmp_path, "celeryd-xapi.service", render("celeryd-xapi.service.j2"))
    print(f"celeryd-xapi.service offline exposure: {score}")
    assert score <= GROUP_MAX_EXPOSURE


@pytest.mark.parametrize(
    ("entry", "valid"),
    [
        ("192.0.2.10", True),
        ("198.51.100.0/24", True),
        ("2001:db8::/64", True),
        ("::1", True),
        ("10.1.2.3/8", True),
        ("proxy.example.org", False),
        ("any", False),
        ("localhost", False),
        ("192.0.2.10 10.0.0.0/8", False),
        ("10.0.0.0/33", False),
        (" 192.0.2.10", False),
        ("", False),
        ("192.0.2.10\nIPAddressAllow=any", False),
    ],
)
def test_allow_list_entries_are_ip_prefixes(entry: str, valid: bool) -> None:
    assert (ip_prefixes.xapi_encodage_not_ip_prefixes([entry]) == []) is valid
    assert (ip_prefixes.xapi_encodage_ip_prefixes([entry]) == [entry]) is valid


def test_catch_all_prefixes_are_found() -> None:
    assert ip_prefixes.xapi_encodage_catch_all_prefixes(["0.0.0.0/0", "::/0", "10.0.0.0/8"]) == [
        "0.0.0.0/0",
        "::/0",
    ]
