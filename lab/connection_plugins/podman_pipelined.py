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
"""

from __future__ import annotations

import shlex

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
        # Without --interactive podman exec closes the command's stdin.
        args = ["exec", "--interactive"] if in_data is not None else ["exec"]
        if self.user:
            args += ["--user", self.user]
        command = shlex.split(to_native(cmd, errors="surrogate_or_strict"))
        return self._podman(args, command, in_data)
