"""The operators' playbooks, run from the scenarios' tests as operators run them."""

from __future__ import annotations

import json
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


# Renders templates as the roles would: include_vars keeps Jinja references lazy, as role
# defaults are, so derived values (xapi_broker_url...) resolve as in a real run.
RENDER = """
- name: Render templates from the roles' defaults
  hosts: all
  connection: local
  gather_facts: false
  tasks:
    - name: Read the defaults and the settings
      ansible.builtin.include_vars:
        file: "{{ item }}"
      loop: "{{ render_var_files }}"
    - name: Render
      ansible.builtin.template:
        src: "{{ item.key }}"
        dest: "{{ render_out }}/{{ inventory_hostname }}-{{ item.value }}"
        mode: "0600"
      loop: "{{ render_templates | dict2items }}"
"""


def render(
    out: Path,
    templates: dict[str, str],
    var_files: list[Path],
    extra: dict[str, object],
    inventory: str = "localhost,",
) -> subprocess.CompletedProcess[str]:
    """Each template (path -> name) rendered for every host of `inventory` into
    `out/<host>-<name>`, with `var_files` read in order and `extra` as extra vars."""
    playbook = out / "render.yml"
    playbook.write_text(RENDER)
    values = {
        **extra,
        "render_out": str(out),
        "render_templates": templates,
        "render_var_files": [str(f) for f in var_files],
    }
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        ["ansible-playbook", "-i", inventory, "-e", json.dumps(values), str(playbook)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
