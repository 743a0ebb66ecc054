"""The collection's tarball (`ansible-galaxy collection build` of the checkout): what it holds
(what an operator needs, nothing of the lab, the tests or the benchmarks), its size, and that
installed it resolves its roles, playbooks and filters by themselves, with no roles path and no
checkout. The full converge of an installed tarball is molecule multi's (operator/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GALAXY = yaml.safe_load((ROOT / "galaxy.yml").read_text())
ROLES = ["xapi", "xapi_broker", "xapi_encodage", "xapi_encodage_pod", "xapi_frontal", "xapi_ops"]
#: The playbooks an operator runs by FQCN (README, "Install as a collection").
PLAYBOOKS = ["site", "check", "status", "dead_letters", "forget", "monitoring"]
#: Top-level entries and paths that must stay out (dev-only, lab, results, environments).
NEVER = (
    "lab/",
    "bench/",
    "molecule/",
    "tests/",
    "testsupport/",
    "tools/",
    "collections/",
    ".ansible/",
    ".venv",
    ".git/",
    ".ci/",
    ".config/",
    "build/",
    "xapi_worker/tests/",
    "xapi_worker/build/",
    "inventories/lab/",
    "roles/ralph_lrs/",
    "playbooks/ralph_lrs.yml",
    "docs/benchmarks",
    "docs/history.md",
    "Makefile",
    "ansible.cfg",
)
#: What the roles read beside themselves (role_path/../../...) and what operators load.
NEEDED = [
    "README.md",
    "CHANGELOG.md",
    "meta/runtime.yml",
    "plugins/filter/ip_prefixes.py",
    "prometheus/xapi.rules.yml",
    "docs/operator-guide.en.md",
    "docs/operator-guide.fr.md",
    "inventories/production/hosts.yml",
    "xapi_worker/pyproject.toml",
    "xapi_worker/README.md",
    "xapi_worker/constraints.txt",
    "xapi_worker/build-requirements.lock",
    "xapi_worker/requirements-debian12.lock",
    "xapi_worker/requirements-debian13.lock",
    "xapi_worker/src/xapi_worker/__init__.py",
]
#: The tarball stays small: it holds text only (measured 1.0.0: ~250 KB; 2026-12-08, with the
#: check package and the dead-letter store: 424 KB).
MAX_BYTES = 500_000


def _env(tmp: Path) -> dict[str, str]:
    """Ansible as an operator's project runs it: none of the checkout's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
    env.update(
        # the tools venv's ansible (tools/requirements.txt), beside the Python of the tests
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        ANSIBLE_COLLECTIONS_PATH=str(tmp / "collections"),
        ANSIBLE_ROLES_PATH=str(tmp / "no-roles"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "tmp"),
        ANSIBLE_HOME=str(tmp / "home"),
    )
    return env


def _run(args: list[str], tmp: Path) -> str:
    proc = subprocess.run(
        args, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, " ".join(args) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("collection")
    _run(["ansible-galaxy", "collection", "build", "--output-path", str(out), str(ROOT)], out)
    path = out / f"esup-pod_xapi-{GALAXY['version']}.tar.gz"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def installed(tarball: Path) -> Path:
    """The operator's project: its requirements.yml naming the tarball, installed."""
    project = tarball.parent / "operator"
    project.mkdir()
    (project / "requirements.yml").write_text(
        yaml.safe_dump({"collections": [{"name": str(tarball), "type": "file"}]})
    )
    (project / "inventory.yml").write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        group: {"hosts": {"lab-frontal": {}}}
                        for group in ("pod_frontal", "xapi_broker", "pod_encodage", "xapi_lrs")
                    }
                }
            }
        )
    )
    _run(
        ["ansible-galaxy", "collection", "install", "-r", "requirements.yml", "-p", "collections"],
        project,
    )
    return project


def test_galaxy_metadata() -> None:
    assert (GALAXY["namespace"], GALAXY["name"]) == ("esup", "pod_xapi")
    runtime = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"].startswith(">=2.19")


def test_tarball_holds_what_an_operator_needs(tarball: Path) -> None:
    with tarfile.open(tarball) as tar:
        names = [m.name + ("/" if m.isdir() else "") for m in tar.getmembers()]
    for needed in NEEDED:
        assert needed in names, needed
    for role in ROLES:
        assert f"roles/{role}/tasks/" in names, role
        assert f"roles/{role}/meta/argument_specs.yml" in names, role
    for playbook in PLAYBOOKS:
        assert f"playbooks/{playbook}.yml" in names, playbook
    bad = [n for n in names if n.startswith(NEVER) or "__pycache__" in n or ".egg-info" in n]
    assert not bad, bad
    assert tarball.stat().st_size < MAX_BYTES, tarball.stat().st_size


def test_installed_manifest(installed: Path) -> None:
    manifest = json.loads(
        (installed / "collections/ansible_collections/esup/pod_xapi/MANIFEST.json").read_text()
    )
    info = manifest["collection_info"]
    assert info["version"] == GALAXY["version"]
    assert "community.general" in info["dependencies"]


def test_installed_roles_resolve_in_the_collection(installed: Path) -> None:
    """`ansible-playbook esup.pod_xapi.site` with no roles path: every task is a role of the
    collection (a collection playbook's short role names resolve in its own collection)."""
    out = _run(
        ["ansible-playbook", "-i", "inventory.yml", "--list-tasks", "esup.pod_xapi.site"],
        installed,
    )
    tasks = [line.strip() for line in out.splitlines() if " : " in line and "TAGS" in line]
    roles = {task.split(" : ")[0] for task in tasks}
    assert roles == {f"esup.pod_xapi.{role}" for role in ROLES}, roles
    others = [f"esup.pod_xapi.{playbook}" for playbook in PLAYBOOKS[1:]]
    _run(["ansible-playbook", "-i", "inventory.yml", "--syntax-check", *others], installed)


def test_installed_filters_resolve(installed: Path) -> None:
    """The worker role's filters (plugins/filter) by their FQCN from the installed copy."""
    out = _run(
        [
            "ansible",
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            "ansible_python_interpreter=/usr/bin/python3",
            "-m",
            "ansible.builtin.debug",
            "-a",
            "msg={{ ['10.0.0.0/8', 'no-address'] | esup.pod_xapi.xapi_encodage_not_ip_prefixes }}",
        ],
        installed,
    )
    assert "no-address" in out and "10.0.0.0/8" not in out, out
