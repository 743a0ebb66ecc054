"""Running things on a lab host as the bundled worker's own user (roles/xapi_encodage:
xapi_encodage_worker_user), which has no login shell: through runuser and sh."""

from __future__ import annotations

import shlex

from xapi_testsupport.pod_on_host import Host, Result

#: The bundled worker's user and group (roles/xapi_encodage defaults).
WORKER = "xapi-worker"


def as_worker_command(command: str, *, cwd: str | None = None) -> str:
    """The shell line that runs `command` (itself a shell line) as the worker's user, in `cwd`
    (entered by that user) when given."""
    inner = f"cd {shlex.quote(cwd)} && {command}" if cwd else command
    return f"runuser -u {WORKER} -- sh -c {shlex.quote(inner)}"


def as_worker(host: Host, command: str, *, cwd: str | None = None) -> Result:
    """`command` run as the worker's user on a testinfra host (its result: rc, stdout, stderr)."""
    return host.run(as_worker_command(command, cwd=cwd))
