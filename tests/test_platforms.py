"""Supported platforms are asserted before any change (Debian 12 and 13 only).

A throw-away container of the lab's Debian 12 image is made to describe itself as Debian 11
(/etc/os-release and /etc/debian_version, which is what Ansible's distribution facts read).
It joins this machine (Debian 12, a local connection) in an inventory, and site.yml runs in
check mode: the run must stop at the release check on every host, naming the host, its
release and the supported ones, with no later task run anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/xapi-lab-debian:bookworm-1"
BULLSEYE = (
    'PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nNAME="Debian GNU/Linux"\n'
    'VERSION_ID="11"\nVERSION="11 (bullseye)"\nVERSION_CODENAME=bullseye\nID=debian\n'
)
ENV = dict(
    os.environ,
    ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
    ANSIBLE_NOCOLOR="1",
    CONTAINERS_CONF=str(ROOT / "lab/containers.conf"),
)


def podman(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV, check=False)


@pytest.fixture(scope="module")
def old_host() -> Iterator[str]:
    if shutil.which("podman") is None or podman("image", "exists", IMAGE).returncode != 0:
        pytest.skip(f"needs podman and the lab image {IMAGE} (make image)")
    name = f"xapi-platform-{uuid.uuid4().hex[:8]}"
    started = podman("run", "-d", "--name", name, IMAGE, "sleep", "600")
    assert started.returncode == 0, started.stderr
    try:
        # /etc/os-release is a link to /usr/lib/os-release: replaced, not written through.
        script = (
            f"rm -f /etc/os-release /usr/lib/os-release && printf '%s' '{BULLSEYE}' >"
            " /etc/os-release && echo 11.11 > /etc/debian_version"
        )
        changed = podman("exec", name, "sh", "-c", script)
        assert changed.returncode == 0, changed.stderr
        yield name
    finally:
        podman("rm", "-f", "-t", "0", name)


def test_an_unsupported_release_stops_every_host_before_any_change(
    old_host: str, tmp_path: Path
) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n  children:\n"
        "    pod_frontal:\n      hosts:\n        localhost:\n"
        "          ansible_connection: local\n"
        "          ansible_python_interpreter: /usr/bin/python3\n"
        "    xapi_broker:\n      hosts:\n        localhost:\n"
        "    pod_encodage:\n      hosts:\n        old-encodage:\n"
        f"          ansible_host: {old_host}\n"
        "          ansible_connection: podman_pipelined\n"
    )
    result = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            str(inventory),
            "--check",
            "-e",
            "@" + str(ROOT / "inventories/lab/group_vars/all/xapi.yml"),
            str(ROOT / "site.yml"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert (
        "old-encodage runs Debian 11.11 (bullseye); the bundle supports Debian 12 (bookworm)"
        " and Debian 13 (trixie) only." in output
    ), output[-3000:]
    # The supported host passed the check, and yet nothing ran after it anywhere.
    # Host results come in any order; the failure's message quotes the task's source too.
    checked = output.split("TASK [xapi : Check that the host runs a supported")[1]
    assert "ok: [localhost]" in checked.split("PLAY RECAP")[0], output
    assert "PLAY [Redis broker" not in output, output[-3000:]
    assert "changed=0" in output, output[-3000:]
