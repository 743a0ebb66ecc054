"""Connection to the lab's podman containers with Ansible pipelining.

containers.podman.podman declares no pipelining because it runs `podman exec` without
`--interactive`, so a command never sees its stdin. Without pipelining every task costs
five `podman exec` (home, mkdir, chmod, run, rm: ~0.25 s each here); with it, one: the
module goes to python's stdin. This subclass only adds `--interactive` when there is
input and declares pipelining; files still go through the container's mount. Lab only:
production uses SSH, where ansible.cfg turns pipelining on already.

The parent runs `podman mount` on every connection, that is on every task; most tasks never
transfer a file (pipelined modules go through stdin), so the mount is made on the first
file transfer of the connection instead.

Commands enter the container with nsenter when the controller runs as root (rootful podman,
as the lab does): every namespace of the container's init, its root and working directory,
and the environment podman exec would give (the container's configured Env). `podman exec`
costs 0.13-0.22 s here (runc starts an exec session each time), nsenter about 1 ms: a task
makes one to four of them, so the lab's transport no longer costs much more than SSH with
ControlPersist does in production. The container's PID and Env are read with `podman
inspect` once and kept in /run/xapi-lab-nsenter/, checked against the PID's start time
(a restarted container gets a new PID). Unlike podman exec, the command runs outside the
container's cgroup, seccomp filter and capability bounds: lab commands run as root inside
anyway, and every service still starts under the container's systemd.
XAPI_LAB_NSENTER=0 goes back to podman exec.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from ansible.module_utils.common.text.converters import to_native
from ansible.plugins.connection import ConnectionBase, ensure_connect
from ansible_collections.containers.podman.plugins.connection.podman import (
    Connection as PodmanConnection,
)

DOCUMENTATION = """
    name: podman_pipelined
    short_description: containers.podman.podman with pipelining (lab containers)
    description:
        - Runs commands in an existing podman container with C(podman exec --interactive)
          when Ansible pipes a module to it; otherwise as containers.podman.podman.
    options:
      remote_addr:
        description: The name or ID of the container.
        default: inventory_hostname
        vars:
          - name: ansible_host
          - name: inventory_hostname
          - name: ansible_podman_host
      remote_user:
        description: User running the commands inside the container.
        ini:
          - section: defaults
            key: remote_user
        env:
          - name: ANSIBLE_REMOTE_USER
        vars:
          - name: ansible_user
      podman_extra_args:
        description: Extra arguments of the podman command line.
        default: ''
        vars:
          - name: ansible_podman_extra_args
      podman_executable:
        description: The podman executable.
        default: podman
        vars:
          - name: ansible_podman_executable
      pipelining:
        description: Pipe modules to the container's python instead of copying them.
        default: true
        type: boolean
        ini:
          - section: connection
            key: pipelining
        env:
          - name: ANSIBLE_PIPELINING
        vars:
          - name: ansible_pipelining
"""


NSENTER_CACHE = Path("/run/xapi-lab-nsenter")


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (after the command name, which may hold spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def container_entry(podman: str, name: str) -> tuple[int, list[str]] | None:
    """The PID of the container's init and its Env, or None when it is not running."""
    cache = NSENTER_CACHE / f"{name}.json"
    try:
        known = json.loads(cache.read_text())
        if _start_time(known["pid"]) == known["start"]:
            return known["pid"], known["env"]
    except (OSError, ValueError, KeyError):
        pass
    result = subprocess.run(
        [
            podman,
            "container",
            "inspect",
            "--format",
            "{{json .State.Pid}} {{json .Config.Env}}",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    pid_text, env_text = result.stdout.strip().split(" ", 1)
    pid, env = int(pid_text), json.loads(env_text)
    start = _start_time(pid) if pid > 0 else None
    if start is None:
        return None
    NSENTER_CACHE.mkdir(mode=0o700, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}")
    tmp.write_text(json.dumps({"pid": pid, "start": start, "env": env}))
    tmp.replace(cache)
    return pid, env


class Connection(PodmanConnection):
    transport = "podman_pipelined"
    has_pipelining = True
    _mount_attempted = False

    def _connect(self) -> Connection:
        # No `podman mount` here: see _mount().
        self._connected = True
        return self

    def _mount(self) -> None:
        """Mount the container's filesystem as the parent's _connect does, once."""
        if not self._mount_attempted:
            self._mount_attempted = True
            PodmanConnection._connect(self)

    @ensure_connect
    def put_file(self, in_path: str, out_path: str) -> None:
        self._mount()
        super().put_file(in_path, out_path)

    @ensure_connect
    def fetch_file(self, in_path: str, out_path: str) -> None:
        self._mount()
        super().fetch_file(in_path, out_path)

    @ensure_connect
    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = False
    ) -> tuple[int, bytes, bytes]:
        ConnectionBase.exec_command(self, cmd, in_data=in_data, sudoable=sudoable)
        command = shlex.split(to_native(cmd, errors="surrogate_or_strict"))
        entry = self._nsenter_entry()
        if entry is not None:
            pid, env = entry
            user = ["runuser", "-u", self.user, "--"] if self.user and self.user != "root" else []
            argv = ["nsenter", "--target", str(pid), "--all", "--root", "--wd=/", "--"]
            argv += ["env", "-i", *env, *user, *command]
            done = subprocess.run(
                argv,
                input=in_data,
                stdin=None if in_data is not None else subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
            return done.returncode, done.stdout, done.stderr
        # Without --interactive podman exec closes the command's stdin.
        args = ["exec", "--interactive"] if in_data is not None else ["exec"]
        if self.user:
            args += ["--user", self.user]
        return self._podman(args, command, in_data)

    def _nsenter_entry(self) -> tuple[int, list[str]] | None:
        if (
            os.geteuid() != 0
            or os.environ.get("XAPI_LAB_NSENTER") == "0"
            or not shutil.which("nsenter")
        ):
            return None
        podman = shutil.which(self.get_option("podman_executable")) or "podman"
        return container_entry(podman, self._container_id)
