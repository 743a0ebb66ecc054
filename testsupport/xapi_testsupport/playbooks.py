"""The operators' playbooks, run from the scenarios' tests as operators run them."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

Runner = Callable[..., subprocess.CompletedProcess[str]]


def molecule_inventory() -> str:
    """The scenario's inventory (its hosts and the lab's group_vars, linked by molecule.yml)."""
    if "MOLECULE_INVENTORY_FILE" in os.environ:
        return str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)
    return str(Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory")


def runner(inventory: str, timeout: float = 300) -> Runner:
    """`run("check.yml", "-v")` runs playbooks/check.yml; `run("site.yml")` the top one."""
    # A fact cache of this test session: the repository's (.ansible/facts) may hold the
    # addresses of an earlier scenario's hosts of the same name.
    facts = tempfile.mkdtemp(prefix="xapi-facts-")
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_CACHE_PLUGIN_CONNECTION=facts,
    )

    def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        path = ROOT / name if name == "site.yml" else ROOT / "playbooks" / name
        return subprocess.run(
            ["ansible-playbook", "-i", inventory, str(path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )

    return run
