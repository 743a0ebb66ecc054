"""sysv: root creates the workers' log and pid directories and gives them to the worker's
user (roles/xapi_encodage/tasks/sysv_dirs.yml), and Celery's init script makes them again at
boot as root. A link planted by Pod's user in a parent, a parent Pod's user owns, or a link in
place of the directory made root chown something else (issue 34's review, M2). Now the paths
are looked at first (tasks/sysv_dir_checks.yml): the run is refused naming the variable, and
nothing is created or changed.

Run for real on this machine, under a root-owned directory of /var/lib (the test's temporary
directory is below /tmp, which anyone may write). Stand-ins: the worker's user is `daemon`,
Pod's user `nobody`.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles/xapi_encodage"
WORKER = "daemon"
POD = "nobody"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(f"/var/lib/xapi-sysv-dirs-test-{os.getpid()}")
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def make_dirs(base: Path, log_dir: Path, pid_dir: Path) -> subprocess.CompletedProcess[str]:
    playbook = base / "dirs.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars_files": [str(ROLE / "vars/main.yml")],
                    "vars": {
                        "xapi_encodage_worker_app": "xapi_worker",
                        "xapi_encodage_worker_user": WORKER,
                        "xapi_encodage_worker_group": WORKER,
                        "xapi_encodage_pod_user": POD,
                        "xapi_encodage_sysv_log_dir": str(log_dir),
                        "xapi_encodage_sysv_pid_dir": str(pid_dir),
                    },
                    "tasks": [
                        {"ansible.builtin.import_tasks": str(ROLE / "tasks/sysv_dir_checks.yml")},
                        {"ansible.builtin.import_tasks": str(ROLE / "tasks/sysv_dirs.yml")},
                    ],
                }
            ]
        )
    )
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", str(playbook)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def canary(base: Path) -> Path:
    """A root-only directory elsewhere, which root must never give to the worker's user."""
    path = base / "etc-canary"
    path.mkdir(mode=0o700)
    return path


def owner(path: Path) -> str:
    return pwd.getpwuid(path.lstat().st_uid).pw_name


def refused(run: subprocess.CompletedProcess[str], variable: str) -> str:
    flat = " ".join((run.stdout + run.stderr).split())
    assert run.returncode != 0, flat[-3000:]
    assert f"{variable} is " in flat, flat[-3000:]
    assert "changed=0" in flat, flat[-3000:]
    return flat


def test_the_directories_are_made_for_the_workers_user(base: Path) -> None:
    log_dir, pid_dir = base / "log" / "celeryd-xapi", base / "run" / "celeryd-xapi"
    run = make_dirs(base, log_dir, pid_dir)
    assert run.returncode == 0, run.stdout + run.stderr
    assert owner(log_dir) == WORKER and owner(pid_dir) == WORKER
    assert log_dir.stat().st_mode & 0o7777 == 0o750
    assert owner(log_dir.parent) == "root"
    again = make_dirs(base, log_dir, pid_dir)
    assert "changed=0" in again.stdout, again.stdout


def test_a_link_planted_in_a_parent_is_refused(base: Path) -> None:
    """Pod's user made the parent of the log directory a link to a root-only directory
    holding a `celeryd-xapi`: root followed it and gave that one to the worker's user."""
    target = canary(base)
    (target / "celeryd-xapi").mkdir(mode=0o700)
    parent = base / "log"
    parent.symlink_to(target)
    os.lchown(parent, pwd.getpwnam(POD).pw_uid, -1)
    run = make_dirs(base, parent / "celeryd-xapi", base / "run" / "celeryd-xapi")
    flat = refused(run, "xapi_encodage_sysv_log_dir")
    assert f"the directories above it {parent} are a symbolic link" in flat, flat[-3000:]
    assert owner(target / "celeryd-xapi") == "root"
    assert not (base / "run").exists()


def test_a_parent_of_pods_user_is_refused(base: Path) -> None:
    """Pod's own encoding worker's /run/celery is Pod's user's: it can put a link where root
    creates the pid directory, between any look and the creation."""
    parent = base / "run-celery"
    parent.mkdir(mode=0o755)
    os.chown(parent, pwd.getpwnam(POD).pw_uid, -1)
    run = make_dirs(base, base / "log" / "celeryd-xapi", parent / "xapi")
    flat = refused(run, "xapi_encodage_sysv_pid_dir")
    assert f"the directories above it {parent} are" in flat, flat[-3000:]
    assert not (parent / "xapi").exists()
    assert not (base / "log").exists()


def test_a_link_in_place_of_the_directory_is_refused(base: Path) -> None:
    """The pid directory itself a link to a root-only directory: root chowned the target."""
    target = canary(base)
    (base / "run").mkdir(mode=0o755)
    pid_dir = base / "run" / "celeryd-xapi"
    pid_dir.symlink_to(target)
    run = make_dirs(base, base / "log" / "celeryd-xapi", pid_dir)
    flat = refused(run, "xapi_encodage_sysv_pid_dir")
    assert "it exists and is a symbolic link" in flat, flat[-3000:]
    assert owner(target) == "root" and target.stat().st_mode & 0o7777 == 0o700


@pytest.mark.parametrize("variable", ["xapi_encodage_sysv_log_dir", "xapi_encodage_sysv_pid_dir"])
def test_an_existing_root_directory_is_not_given_to_the_worker(base: Path, variable: str) -> None:
    """An existing directory of root's (/var/log, /run/lock, /etc...) named as the log or pid
    directory was accepted and given to the worker's user (session 5's review, M1): only one
    the worker's user owns already, or a missing one, is taken."""
    site = base / "site-dir"
    site.mkdir(mode=0o755)
    (base / "log").mkdir(mode=0o755)
    dirs = {
        "xapi_encodage_sysv_log_dir": base / "log" / "celeryd-xapi",
        "xapi_encodage_sysv_pid_dir": base / "run" / "celeryd-xapi",
    }
    dirs[variable] = site
    run = make_dirs(base, dirs["xapi_encodage_sysv_log_dir"], dirs["xapi_encodage_sysv_pid_dir"])
    flat = refused(run, variable)
    assert f'{variable} is "{site}": it exists and is owned by root' in flat, flat[-3000:]
    assert owner(site) == "root" and site.stat().st_mode & 0o7777 == 0o755
    # The worker's own, made by an earlier run: accepted, left as it is.
    os.chown(site, pwd.getpwnam(WORKER).pw_uid, -1)
    again = make_dirs(base, dirs["xapi_encodage_sysv_log_dir"], dirs["xapi_encodage_sysv_pid_dir"])
    assert again.returncode == 0, again.stdout + again.stderr


def test_the_default_directory_of_another_user_is_refused_with_a_way_out(base: Path) -> None:
    """The default pid directory, left by the workers of another user (the worker's user or
    the worker's app changed): the refusal's advice was "choose a path that does not exist
    yet (the default: <that same path>)" (the review of sec5, N4); it now says what to do."""
    default = Path("/run/celeryd-xapi")
    if default.exists():
        pytest.skip(f"{default} exists on this machine")
    default.mkdir(mode=0o755)
    try:
        run = make_dirs(base, base / "log" / "celeryd-xapi", default)
        flat = refused(run, "xapi_encodage_sysv_pid_dir")
    finally:
        default.rmdir()
    assert "it is the default path, made earlier for another user" in flat, flat[-3000:]
    assert "(the default: /run/celeryd-xapi)" not in flat, flat[-3000:]


def test_the_example_inventory_shows_the_roles_own_directories() -> None:
    """The production example showed Pod's encoding worker's /var/log/celery and /run/celery
    (Pod's user's, refused now) as the values of the sysv directories."""
    import yaml

    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    example = ROOT / "inventories/production/group_vars/pod_encodage.yml"
    shown = {}
    for line in example.read_text().splitlines():
        if line.startswith("# xapi_encodage_sysv_") and ":" in line:
            name, _, rest = line[2:].partition(":")
            shown[name] = rest.split("  #")[0].strip()
    for name in ("xapi_encodage_sysv_log_dir", "xapi_encodage_sysv_pid_dir"):
        assert shown.get(name) == defaults[name], (name, shown.get(name))
