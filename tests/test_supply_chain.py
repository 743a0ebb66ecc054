"""What the encoding hosts install is pinned to the byte (security review point 10).

The worker's venv comes from a lock where every distribution has its sha256; the wheel's
build dependencies are exact and hashed too, and the wheel built twice is the same file; Pod's
checkout records the commit its tag resolved to and refuses a tag that moved.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "xapi_worker"
ROLE = ROOT / "roles" / "xapi_encodage"
POD_ROLE = ROOT / "roles" / "xapi_encodage_pod"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(path: Path) -> list[str]:
    """The requirement entries of a requirements file, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for entry in entries(path):
        match = PIN.match(entry)
        assert match, f"{path.name}: not an exact pin: {entry}"
        found[canonical(match[1])] = match[2]
    return found


@pytest.mark.parametrize(
    "lock", ["requirements-debian12.lock", "requirements-debian13.lock", "build-requirements.lock"]
)
def test_every_entry_of_the_locks_is_pinned_and_hashed(lock):
    path = WORKER / lock
    assert path.is_file(), f"xapi_worker/{lock} missing (make lock)"
    for entry in entries(path):
        assert PIN.match(entry), entry
        digests = re.findall(r"--hash=sha256:([0-9a-f]+)", entry)
        assert digests and all(len(d) == 64 for d in digests), entry
        assert not re.search(r"--hash=(?!sha256:)", entry), entry


@pytest.mark.parametrize("release", ["12", "13"])
def test_the_lock_holds_what_the_worker_needs_at_the_constraints_versions(release):
    locked = pins(WORKER / f"requirements-debian{release}.lock")
    constrained = pins(WORKER / "constraints.txt")
    project = tomllib.loads((WORKER / "pyproject.toml").read_text())
    for requirement in project["project"]["dependencies"]:
        name = canonical(re.match(r"[A-Za-z0-9._-]+", requirement)[0])
        assert name in locked, f"{name}: a dependency of the worker missing from the lock"
    assert "xapi-worker" not in locked
    for name, version in locked.items():
        assert constrained.get(name) == version, f"{name}: lock {version}, constraints differ"


def test_build_dependencies_are_exact_pins_and_locked():
    project = tomllib.loads((WORKER / "pyproject.toml").read_text())
    requires = project["build-system"]["requires"]
    assert requires
    exact = {}
    for requirement in requires:
        match = PIN.match(requirement)
        assert match and match.end() == len(requirement), f"not an exact pin: {requirement}"
        exact[canonical(match[1])] = match[2]
    assert pins(WORKER / "build-requirements.lock") == exact


def test_the_role_installs_the_lock_with_require_hashes_and_the_wheel_alone():
    tasks = {t["name"]: t for t in yaml.safe_load((ROLE / "tasks/venv.yml").read_text())}
    block = {t["name"]: t for t in tasks["Install the bundled worker"]["block"]}
    deps = block["Install the worker's dependencies from the hashed lock"]["ansible.builtin.pip"]
    assert deps["requirements"].endswith("/requirements.lock")
    assert "--require-hashes" in deps["extra_args"]
    build = block["Build the worker's wheel on the controller"]
    assert "build-worker-wheel.sh" in build["ansible.builtin.command"]["argv"]
    assert "xapi_encodage_worker_build_lock" in build["ansible.builtin.command"]["argv"]
    variables = (ROLE / "vars/main.yml").read_text()
    assert "'PIP_NO_DEPS': '1'" in variables and "'PIP_NO_INDEX': '1'" in variables
    # No constraints file under the worker's pip any more: the lock is the pin set.
    assert "PIP_CONSTRAINT" not in variables


def build(out: Path) -> str:
    files = sorted(
        str(p.relative_to(WORKER))
        for p in [
            WORKER / "pyproject.toml",
            WORKER / "README.md",
            *(WORKER / "src/xapi_worker").glob("*.py"),
            WORKER / "src/xapi_worker/py.typed",
        ]
    )
    subprocess.run(
        [
            "bash",
            str(ROLE / "files/build-worker-wheel.sh"),
            sys.executable,
            str(WORKER),
            str(WORKER / "build-requirements.lock"),
            str(out),
            *files,
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = out.glob("xapi_worker-*.whl")
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_the_wheel_built_twice_is_the_same_file(tmp_path):
    assert build(tmp_path / "one") == build(tmp_path / "two")


def test_pods_commit_is_recorded_and_a_moved_tag_refused_before_the_checkout():
    defaults = yaml.safe_load((POD_ROLE / "defaults/main.yml").read_text())
    assert defaults["xapi_encodage_pod_allow_moved_tag"] is False
    specs = yaml.safe_load((POD_ROLE / "meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert options["xapi_encodage_pod_allow_moved_tag"]["type"] == "bool"
    names = [t["name"] for t in yaml.safe_load((POD_ROLE / "tasks/code.yml").read_text())]
    clone = names.index("Clone Pod on a fresh host, or move it for the upgrade asked (force false)")
    asked = names.index("Ask the repository where the version to check out points now")
    assert asked < names.index("Refuse a version that is both a tag and a branch of the repository")
    assert names.index("Refuse a version that is both a tag and a branch of the repository") < clone
    assert asked < clone
    assert names.index("Check that the checkout is the commit the repository named") == clone + 1
    assert names.index("Refuse a tag that moved since it was checked out") < clone
    assert names.index("Record the commit Pod's version resolved to") > clone
    assert "xapi_encodage_pod_allow_moved_tag" in (POD_ROLE / "README.md").read_text()
