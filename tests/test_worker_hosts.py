"""Where the worker runs (issue 32, item 4): the hosts of the group `xapi_worker`, or the
encoding hosts when the inventory has no such group.

`ansible-playbook --list-hosts` of every playbook that reaches the worker: an inventory of
earlier releases (only `pod_encodage`: the lab's, the production example) gives the hosts it
gave before; one with an `xapi_worker` group runs the worker, its status, its dead letters
and its monitoring check there. molecule/default converges the lab's inventory end to end,
molecule/multi one with a worker host outside `pod_encodage`.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")


@functools.cache
def plays(inventory: Path, playbook: str) -> list[tuple[str, list[str]]]:
    """(play name, sorted hosts) of each play, as --list-hosts prints them."""
    result = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), "--list-hosts", str(ROOT / playbook)],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found: list[tuple[str, list[str]]] = []
    for line in result.stdout.splitlines():
        header = re.match(r"\s*play #\d+ \(.*?\): (.*?)\tTAGS:", line)
        if header:
            found.append((header.group(1), []))
        elif found and re.match(r"\s{6}\S+$", line):
            found[-1][1].append(line.strip())
    return [(name, sorted(hosts)) for name, hosts in found]


def hosts_of(inventory: Path, playbook: str, play: str) -> list[str]:
    return next(hosts for name, hosts in plays(inventory, playbook) if name.startswith(play))


# site.yml imports playbooks/xapi_encodage.yml: its play is the one listed there.
WORKER_PLAYS = [
    ("site.yml", "The xAPI worker on its hosts"),
    ("playbooks/status.yml", "Status of the xAPI pipeline"),
]


def test_the_lab_inventory_runs_every_play_where_it_did() -> None:
    """The lab's inventory has no xapi_worker group: each play of site.yml on the hosts it
    had before the group existed."""
    assert [hosts for _, hosts in plays(ROOT / "inventories/lab", "site.yml")] == [
        ["encodage", "frontal", "lrs"],  # facts and release check
        ["frontal"],  # broker
        ["frontal"],  # unmanaged broker's preflight
        [],  # encoding hosts left out of xapi_worker: none without the group
        ["encodage"],  # the worker
        ["frontal"],  # frontal
        ["encodage", "frontal"],  # monitoring
        ["frontal"],  # move from Pod's Redis (last: playbooks/site.yml)
    ]


@pytest.mark.parametrize(("playbook", "play"), WORKER_PLAYS)
def test_without_the_group_the_worker_runs_on_the_encoding_hosts(playbook: str, play: str) -> None:
    production = ROOT / "inventories/production"
    assert hosts_of(production, playbook, play) == [
        "pod-enc1.univ.example.fr",
        "pod-enc2.univ.example.fr",
    ]


def test_without_the_group_operations_stay_on_the_encoding_hosts() -> None:
    production = ROOT / "inventories/production"
    # every one: each keeps its nodes' dead letters on its disk (the broker's list: the first)
    assert hosts_of(production, "playbooks/dead-letters.yml", "Dead letters") == [
        "pod-enc1.univ.example.fr",
        "pod-enc2.univ.example.fr",
    ]


def worker_inventory(directory: Path, group: str) -> Path:
    inventory = directory / "hosts.yml"
    inventory.write_text(
        "all:\n  children:\n"
        "    pod_frontal:\n      hosts:\n        frontal:\n"
        "    xapi_broker:\n      hosts:\n        frontal:\n"
        "    pod_encodage:\n      hosts:\n        enc1:\n        enc2:\n"
        f"    xapi_worker:\n{group}"
    )
    return inventory


@pytest.fixture(scope="module")
def with_group(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dedicated worker host and the frontal; the encoding hosts no longer run the worker."""
    return worker_inventory(
        tmp_path_factory.mktemp("group"), "      hosts:\n        frontal:\n        small:\n"
    )


@pytest.mark.parametrize(("playbook", "play"), WORKER_PLAYS)
def test_the_worker_group_names_the_worker_hosts(
    with_group: Path, playbook: str, play: str
) -> None:
    assert hosts_of(with_group, playbook, play) == ["frontal", "small"]


def test_the_worker_groups_operations_and_monitoring(with_group: Path) -> None:
    assert hosts_of(with_group, "playbooks/dead-letters.yml", "Dead letters") == [
        "frontal",
        "small",
    ]
    assert hosts_of(with_group, "playbooks/monitoring.yml", "Monitoring") == ["frontal", "small"]


def test_an_empty_worker_group_means_the_encoding_hosts(tmp_path: Path) -> None:
    inventory = worker_inventory(tmp_path, "      hosts: {}\n")
    assert hosts_of(inventory, "site.yml", "The xAPI worker") == ["enc1", "enc2"]


def test_encoding_hosts_out_of_the_group_are_checked_first(with_group: Path) -> None:
    """Review H2: an encoding host left out of xapi_worker is looked at for the worker of
    earlier releases (roles/xapi, tasks/retired_worker.yml) before the worker's play, and in
    site.yml's first play, before any change."""
    assert hosts_of(with_group, "site.yml", "The encoding hosts left out") == ["enc1", "enc2"]
    names = [name for name, _ in plays(with_group, "site.yml")]
    assert names.index("The encoding hosts left out of xapi_worker") < names.index(
        "The xAPI worker on its hosts"
    )
    first = (ROOT / "playbooks/site.yml").read_text().split("\n- name: Broker")[0]
    assert "tasks_from: retired_worker.yml" in first


def test_without_the_group_no_encoding_host_is_checked() -> None:
    production = ROOT / "inventories/production"
    assert hosts_of(production, "site.yml", "The encoding hosts left out") == []


@pytest.mark.parametrize("tag", ["settings", "service", "packages"])
def test_the_workers_user_is_created_under_each_tag(tag: str) -> None:
    """Review M1: `--tags settings` (the spool's move, the settings) or `--tags service`
    (the init script's stop) must not reach a task needing the worker's user without
    creating it first."""
    result = subprocess.run(
        [
            "ansible-playbook",
            *("-i", str(ROOT / "inventories/lab"), "--list-tasks", "--tags", tag),
            str(ROOT / "playbooks/xapi_encodage.yml"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Create the worker's user" in result.stdout


def firewall_clients(inventory: Path, directory: Path) -> tuple[list[str], list[str], list[str]]:
    """The hosts the broker's firewall lets in (roles/xapi_broker, its defaults and vars);
    Pod's frontals with the worker's hosts as roles/xapi defines them (xapi_worker_hosts); and
    the hosts of the former fixed list of groups."""
    play, out = directory / "clients.yml", directory / "clients.json"
    play.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n"
        f"  vars_files: [{ROOT}/roles/xapi/defaults/main.yml,"
        f" {ROOT}/roles/xapi_broker/defaults/main.yml, {ROOT}/roles/xapi_broker/vars/main.yml]\n"
        "  tasks:\n    - ansible.builtin.copy:\n"
        f"        dest: {out}\n"
        "        content: >-\n"
        "          {{ [xapi_broker_firewall_client_hosts | sort,\n"
        "          (groups.get('pod_frontal', []) + xapi_worker_hosts) | unique | sort,\n"
        "          groups | dict2items | selectattr('key', 'in', ['pod_frontal',\n"
        "          'pod_encodage', 'xapi_worker']) | map(attribute='value') | flatten\n"
        "          | unique | sort]\n"
        "          | to_json }}\n"
    )
    result = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), str(play)],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return tuple(json.loads(out.read_text()))


def molecule_inventory(scenario: str, directory: Path) -> Path:
    """A scenario's hosts and groups (molecule.yml's platforms) as an inventory."""
    platforms = yaml.safe_load((ROOT / f"molecule/{scenario}/molecule.yml").read_text())
    groups: dict[str, dict] = {}
    for platform in platforms["platforms"]:
        for group in platform.get("groups", []):
            groups.setdefault(group, {"hosts": {}})["hosts"][platform["name"]] = None
    inventory = directory / f"{scenario}.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": groups}}))
    return inventory


@pytest.mark.parametrize(
    "inventory",
    ["inventories/lab", "inventories/production", "default", "sysv", "multi", "resilience"],
)
def test_the_firewall_lets_in_the_same_hosts_as_before(tmp_path: Path, inventory: str) -> None:
    """Review L12: the broker's firewall now lets in Pod's frontals and the worker's hosts
    (roles/xapi), no longer every encoding host; every inventory of the repository gives the
    same hosts as the former fixed list [pod_frontal, pod_encodage, xapi_worker]."""
    if inventory.startswith("inventories/"):  # its hosts (group_vars: the vault's own)
        path = tmp_path / "hosts.yml"
        shutil.copy(ROOT / inventory / "hosts.yml", path)
    else:
        path = molecule_inventory(inventory, tmp_path)
    clients, expected, before = firewall_clients(path, tmp_path)
    assert clients == expected == before
    assert clients


def test_encoding_hosts_out_of_the_worker_group_are_not_let_in(
    with_group: Path, tmp_path: Path
) -> None:
    """Review L12: an encoding host out of xapi_worker (it runs no worker, holds no broker
    credential: ffmpeg on uploaded media runs there) no longer reaches the broker's port."""
    clients, expected, before = firewall_clients(with_group, tmp_path)
    assert clients == expected == ["frontal", "small"]
    assert before == ["enc1", "enc2", "frontal", "small"]


# The worker's command line as a script that records its arguments in the file its config
# variable names (each host's own): what the playbook asked of each host.
RECORDER = '#!/bin/sh\nprintf "%s\\n" "$*" > "$XAPI_WORKER_CONFIG"\necho "listed 0"\n'


def test_the_brokers_list_is_read_by_the_first_live_host(tmp_path: Path) -> None:
    """Review L6 (session 5): `--where all` (the broker's list, shared by every worker host)
    went to the inventory's first worker host only; when that one was unreachable or refused
    (no bundled worker recorded there), no host read the list and the run said nothing. Now
    the first host still in the play reads it, and the output says which."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/xapi-worker").write_text(RECORDER)
    (venv / "bin/xapi-worker").chmod(0o755)
    (tmp_path / "broker.env").write_text("")
    hosts = ""
    for name in ("enc1", "enc2", "enc3"):
        fact = tmp_path / f"{name}.fact"
        if name != "enc1":  # enc1: no bundled worker recorded (refused by worker_fact.yml)
            record = {
                "app": "xapi_worker",
                "venv": str(venv),
                "config": str(tmp_path / f"{name}.args"),
                "user": pwd.getpwuid(os.getuid()).pw_name,
                "brokers": [{"address": "b1", "env": str(tmp_path / "broker.env"), "nodes": ["x"]}],
            }
            fact.write_text(json.dumps(record))
        hosts += f"        {name}:\n          xapi_ops_worker_fact: {fact}\n"
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n  vars:\n    ansible_connection: local\n    ansible_become: false\n"
        "    ansible_python_interpreter: /usr/bin/python3\n"
        f"  children:\n    pod_encodage:\n      hosts:\n{hosts}"
    )
    result = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), str(ROOT / "playbooks/dead-letters.yml")],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "no bundled worker recorded" in output, output[-3000:]
    assert (tmp_path / "enc2.args").read_text().startswith("dead-letters list --where all ")
    assert (tmp_path / "enc3.args").read_text().startswith("dead-letters list --where disk ")
    assert "The broker lists: read by enc2." in output, output[-3000:]
