"""Root writes settings_local.py and xapi_celery.py into Pod's tree, which `pod` owns, without a
window between its check and its write (security review, round two, finding 3).

The playbooks run here (local connection, as the test's user, root in CI) against a tree
owned by `nobody`, standing in for pod. A callback plugin plays pod at the worst moment: when
the write task starts, after every check before it, it swaps a link in for the file (or for
the directory above it) pointing at a root-only canary. The old layout (a stat and a
realpath, then blockinfile) wrote the secret-bearing block into the canary; now the run
refuses and the canary is untouched.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret-broker-value-0123"
MARKER = "# {mark} xAPI settings managed by Ansible (Esup-Pod xAPI bundle)"

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root (chown to another user)")

SWAP = '''
import os
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    """Plays pod: when the write task starts, a link replaces SWAP_PATH (kept aside)."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "swap"
    CALLBACK_NEEDS_ENABLED = True

    def v2_playbook_on_task_start(self, task, is_conditional):
        if os.environ["SWAP_BEFORE"] not in task.get_name():
            return
        path = os.environ["SWAP_PATH"]
        os.rename(path, path + ".keep")
        os.symlink(os.environ["SWAP_TO"], path)
        os.lchown(path, int(os.environ["SWAP_UID"]), -1)
'''


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """Pod's tree owned by nobody, its settings file, and a root-only canary elsewhere."""
    nobody = pwd.getpwnam("nobody")
    custom = tmp_path / "pod" / "pod" / "custom"
    custom.mkdir(parents=True)
    settings = custom / "settings_local.py"
    settings.write_text("DEBUG = False\n")
    for path in (tmp_path / "pod", tmp_path / "pod" / "pod", custom, settings):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir(mode=0o700)
    canary = secret_dir / "canary"
    canary.write_text("# root's own, and valid Python\n")
    canary.chmod(0o600)
    plugins = tmp_path / "callbacks"
    plugins.mkdir()
    (plugins / "swap.py").write_text(SWAP)
    return {
        "root": tmp_path,
        "custom": custom,
        "settings": settings,
        "canary": canary,
        "secret_dir": secret_dir,
        "plugins": plugins,
    }


def playbook(tmp_path: Path, tasks: list[dict], vars_files: list[Path] | None = None) -> Path:
    path = tmp_path / "play.yml"
    play = {
        "vars_files": [str(f) for f in vars_files or []],
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars": {"ansible_python_interpreter": "/usr/bin/python3"},
        "tasks": tasks,
        "handlers": [
            {
                "name": "Settings changed",
                "ansible.builtin.debug": {"msg": "changed"},
                "listen": "xapi settings_local changed",
            }
        ],
    }
    path.write_text(json.dumps([play]))
    return path


def settings_block(path: Path, state: str = "present") -> dict:
    return {
        "name": "The block",
        "ansible.builtin.include_role": {"name": "xapi", "tasks_from": "settings_block.yml"},
        "vars": {
            "xapi_settings_path": str(path),
            "xapi_settings_values": {"XAPI_BROKER_SECRET": SECRET},
            "xapi_settings_owner": "root",
            "xapi_settings_group": "nogroup",
            "xapi_settings_state": state,
        },
    }


def run(
    tree: dict[str, Path],
    tasks: list[dict],
    library: bool = False,
    inventory: str = "localhost,",
    extra: dict | None = None,
    vars_files: list[Path] | None = None,
    **swap: str,
) -> subprocess.CompletedProcess:
    """The tasks as a playbook; ``library``: the module alone, without its role loaded;
    ``inventory``, ``extra``, ``vars_files``: its inventory, extra variables and files of
    variables."""
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_CALLBACK_PLUGINS=str(tree["plugins"]),
    )
    if library:
        env["ANSIBLE_LIBRARY"] = str(ROOT / "plugins/modules")
    if swap:
        env.update(
            ANSIBLE_CALLBACKS_ENABLED="swap",
            SWAP_UID=str(pwd.getpwnam("nobody").pw_uid),
            **{f"SWAP_{k.upper()}": v for k, v in swap.items()},
        )
    return subprocess.run(
        [
            "ansible-playbook",
            *("-i", inventory, str(playbook(tree["root"], tasks, vars_files))),
            *(("-e", json.dumps(extra)) if extra else ()),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def assert_canary_untouched(tree: dict[str, Path]) -> None:
    canary = tree["canary"]
    assert canary.read_text() == "# root's own, and valid Python\n", "root wrote through pod's link"
    st = canary.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)


@pytest.mark.parametrize("swapped", ["file", "directory"])
def test_a_link_swapped_in_before_the_write_is_refused(tree, swapped: str) -> None:
    """After the checks, as the write starts, pod puts a link in place of settings_local.py
    (to the canary) or of pod/custom (to a root-only directory holding a settings file)."""
    if swapped == "file":
        path, target = tree["settings"], tree["canary"]
    else:
        path, target = tree["custom"], tree["secret_dir"]
        tree["canary"].rename(tree["secret_dir"] / "settings_local.py")
        tree["canary"] = tree["secret_dir"] / "settings_local.py"
    result = run(
        tree,
        [settings_block(tree["settings"])],
        before="Write the xAPI block of",
        path=str(path),
        to=str(target),
    )
    output = result.stdout + result.stderr
    assert_canary_untouched(tree)
    assert SECRET not in output
    assert result.returncode != 0, output[-3000:]
    assert "is not a plain file on a plain path" in output, output[-3000:]


def test_a_hard_link_to_a_root_file_is_refused(tree) -> None:
    """With fs.protected_hardlinks off, pod could hard-link a root file there: root would
    read it and hand its content back in a file pod reads."""
    tree["settings"].unlink()
    os.link(tree["canary"], tree["settings"])
    result = run(tree, [settings_block(tree["settings"])])
    assert result.returncode != 0
    assert "hard links" in result.stdout, result.stdout[-3000:]
    assert_canary_untouched(tree)


def test_the_block_is_written_as_blockinfile_wrote_it(tree) -> None:
    """Same bytes as the former blockinfile task (so a converged site stays unchanged), root's
    new file 0640, then idempotent, then removed with state absent."""
    reference = tree["custom"] / "reference.py"
    shutil.copy(tree["settings"], reference)
    block = f"XAPI_BROKER_SECRET = {json.dumps(SECRET)}"
    blockinfile = {
        "name": "As before",
        "ansible.builtin.blockinfile": {"path": str(reference), "marker": MARKER, "block": block},
    }
    first = run(tree, [settings_block(tree["settings"]), blockinfile])
    assert first.returncode == 0, first.stdout[-3000:]
    assert tree["settings"].read_bytes() == reference.read_bytes()
    st = tree["settings"].stat()
    assert (st.st_uid, st.st_mode & 0o777, st.st_nlink) == (0, 0o640, 1)
    assert "changed=2" in first.stdout
    again = run(tree, [settings_block(tree["settings"])])
    assert "changed=0" in again.stdout, again.stdout[-3000:]
    removed = run(tree, [settings_block(tree["settings"], "absent")])
    assert removed.returncode == 0, removed.stdout[-3000:]
    assert tree["settings"].read_text() == "DEBUG = False\n"


def test_xapi_celery_is_written_by_the_same_module(tree) -> None:
    """The frontal's pod/custom/xapi_celery.py was a template task (no check at all): now the
    same one-step write, which refuses a directory link on its path."""
    tasks = (ROOT / "roles/xapi_frontal/tasks/settings.yml").read_text()
    assert "ansible.builtin.template:" not in tasks
    assert tasks.count("esup.pod_xapi.xapi_pod_file:") == 2
    target = tree["custom"] / "xapi_celery.py"
    write = {
        "name": "Write xapi_celery.py",
        "xapi_pod_file": {
            "path": str(target),
            "content": "BROKER_TRANSPORT_OPTIONS = {}\n",
            "owner": "root",
            "group": "nogroup",
            "mode": "0644",
            "python": True,
        },
    }
    result = run(
        tree,
        [write],
        library=True,
        before="Write xapi_celery",
        path=str(tree["custom"]),
        to=str(tree["secret_dir"]),
    )
    assert result.returncode != 0, result.stdout[-3000:]
    assert "is not a plain file on a plain path" in result.stdout
    assert list(tree["secret_dir"].iterdir()) == [tree["canary"]]


def test_a_huge_file_planted_by_pod_is_not_read(tree) -> None:
    """pod chooses the size of settings_local.py: root read it whole into memory, compiled it
    and wrote it back (here 8 MiB of comments, valid Python; pod could make it the size of its
    disk). Now root reads at most max_bytes (4 MiB) and refuses a bigger file, naming it;
    nothing is written."""
    settings = tree["settings"]
    size = 8 << 20
    settings.write_bytes((b"#" * 1023 + b"\n") * (size // 1024))
    before = settings.stat()
    result = run(tree, [settings_block(settings)])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"Refused: {settings} holds {size} bytes" in output, output[-3000:]
    assert "(max_bytes)" in output, output[-3000:]
    after = settings.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert [p.name for p in tree["custom"].iterdir()] == ["settings_local.py"]
    assert SECRET not in output


def test_a_file_at_the_limit_is_written(tree) -> None:
    """The bound is max_bytes itself: a file of that size is read and written as before."""
    settings = tree["settings"]
    settings.write_bytes(b"#" * ((4 << 20) - 1) + b"\n")
    result = run(tree, [settings_block(settings)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert SECRET in settings.read_text()


def with_old_block(tree: dict[str, Path]) -> str:
    """settings_local.py as earlier releases left it on an encoding host: the operator's lines,
    then the xAPI block with the passwords (root's, Pod's group's, 0640)."""
    settings = tree["settings"]
    text = f"DEBUG = False\n{MARKER.format(mark='BEGIN')}\nXAPI_LRS_PWD = {SECRET!r}\n"
    settings.write_text(text + MARKER.format(mark="END") + "\n")
    os.chown(settings, 0, pwd.getpwnam("nobody").pw_gid)
    settings.chmod(0o640)
    return settings.read_text()


def groups_inventory(tree: dict[str, Path], **groups: list[str]) -> str:
    """An inventory of this machine (local connection, no become) in the given groups."""
    inventory = tree["root"] / "hosts.yml"
    inventory.write_text(
        "all:\n  vars:\n    ansible_connection: local\n    ansible_become: false\n"
        "    ansible_python_interpreter: /usr/bin/python3\n  children:\n"
        + "".join(
            f"    {group}:\n      hosts:\n" + "".join(f"        {h}:\n" for h in hosts)
            for group, hosts in groups.items()
        )
    )
    return str(inventory)


# roles/xapi_encodage/tasks/pod_settings.yml outside the role: its defaults and derived values.
ENCODAGE_VARS = [
    ROOT / "roles/xapi/defaults/main.yml",
    ROOT / "roles/xapi_encodage/defaults/main.yml",
    ROOT / "roles/xapi_encodage/vars/main.yml",
    ROOT / "roles/xapi_encodage_pod/defaults/main.yml",
]


@pytest.mark.parametrize("in_pod_encodage", [True, False], ids=["pod-encodes", "moved-out"])
def test_a_worker_host_loses_the_old_block_wherever_pod_is(tree, in_pod_encodage: bool) -> None:
    """Review L4: an encoding host of the earlier layout moved to xapi_worker alone (out of
    pod_encodage: encoding moved elsewhere, Pod's tree still there) kept the LRS and broker
    passwords in settings_local.py, which Pod's user reads. With the bundled worker, the block
    goes on every worker host that is not a frontal; the operator's lines stay."""
    with_old_block(tree)
    groups = {"xapi_worker": ["localhost"], "pod_frontal": ["frontal"]}
    if in_pod_encodage:
        groups["pod_encodage"] = ["localhost"]
    task = {
        "name": "Pod's settings",
        "ansible.builtin.include_tasks": str(ROOT / "roles/xapi_encodage/tasks/pod_settings.yml"),
    }
    extra = {
        "xapi_encodage_pod_dir": str(tree["root"] / "pod"),
        "xapi_encodage_pod_group": "nogroup",
        "xapi_lrs_url": "https://lrs.example.org/xAPI/",
        "xapi_lrs_login": "pod",
        "xapi_lrs_password": SECRET,
        "xapi_broker_password": SECRET,
        "xapi_broker_producer_password": SECRET,
        "xapi_broker_host": "broker.example.org",
    }
    inventory = groups_inventory(tree, **groups)
    result = run(tree, [task], inventory=inventory, extra=extra, vars_files=ENCODAGE_VARS)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert tree["settings"].read_text() == "DEBUG = False\n"
    assert "changed=1" in result.stdout, result.stdout[-3000:]
    assert SECRET not in result.stdout + result.stderr


def retired_check(tree: dict[str, Path]) -> subprocess.CompletedProcess:
    """roles/xapi/tasks/retired_worker.yml on this machine: an encoding host left out of the
    xapi_worker group (another host runs the worker)."""
    inventory = groups_inventory(
        tree, pod_encodage=["localhost"], xapi_worker=["worker"], pod_frontal=["frontal"]
    )
    task = {
        "name": "The retired worker",
        "ansible.builtin.include_role": {"name": "xapi", "tasks_from": "retired_worker.yml"},
    }
    return run(tree, [task], inventory=inventory, extra={"xapi_pod_dir": str(tree["root"] / "pod")})


def test_the_retired_worker_check_refuses_a_left_block(tree) -> None:
    """Review L3: an encoding host out of xapi_worker whose operator removed the worker's
    files but not the xAPI block of settings_local.py (both passwords, in a file Pod's user
    reads) passed every run. Now it is refused, naming the file; nothing is changed."""
    before = with_old_block(tree)
    result = retired_check(tree)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"{tree['settings']} (its xAPI block)" in output, output[-3000:]
    assert "Nothing was changed" in output
    assert tree["settings"].read_text() == before
    assert SECRET not in output
    # Once the block is gone (the operator guide's step), the check passes.
    tree["settings"].write_text("DEBUG = False\n")
    result = retired_check(tree)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_the_retired_worker_check_follows_no_link(tree) -> None:
    """The check reads Pod's file as the writes do: a link pod put there (to a root file
    holding the markers) is refused, not followed."""
    tree["canary"].write_text(MARKER.format(mark="BEGIN") + "\n")
    tree["settings"].unlink()
    tree["settings"].symlink_to(tree["canary"])
    result = retired_check(tree)
    assert result.returncode != 0
    assert "is not a plain file on a plain path" in result.stdout, result.stdout[-3000:]


def test_removing_an_absent_block_leaves_the_file_as_it_is(tree) -> None:
    """With the bundled worker the removal runs on every worker host: a settings_local.py
    without the block (Pod's own, pod's and 0644 here) is not rewritten, nor given to root;
    a host without Pod's tree has nothing to remove."""
    settings = tree["settings"]
    settings.chmod(0o644)
    before = settings.stat()
    result = run(tree, [settings_block(settings, "absent")])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "changed=0" in result.stdout, result.stdout[-3000:]
    after = settings.stat()
    assert (after.st_ino, after.st_uid, after.st_mode) == (
        before.st_ino,
        before.st_uid,
        before.st_mode,
    )
    missing = tree["root"] / "no-pod" / "pod" / "custom" / "settings_local.py"
    result = run(tree, [settings_block(missing, "absent")])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "changed=0" in result.stdout, result.stdout[-3000:]
