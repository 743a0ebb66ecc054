"""A foothold as pod (the user that runs ffmpeg on uploaded media on an encoding host) reads
none of the worker's secrets or statements, and plants nothing the worker runs (security
review round two, finding 2): the bundled worker runs as a system user of its own, from its
root-owned venv, its settings and spool that user's alone.

Pod's user tries, on the converged encoding host: to read and write the spool, to read the
worker's settings and broker files, and to plant a module (`xapi_worker`, which `celery -A`
imports, and the `sitecustomize`/`.pth` hooks every interpreter runs) in every directory on
the running worker's import path: the directory of its script, its working directory (which
`celery -A` puts first) and the rest of its sys.path, as its own interpreter computes it with
its own environment. Nothing is read, nothing is planted, and the worker, restarted, runs
nothing planted.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest
from xapi_testsupport.pod_on_host import as_pod
from xapi_testsupport.polling import wait_until
from xapi_testsupport.worker_on_host import WORKER

NODE_UNIT = "celeryd-xapi@xapi.service"
SPOOL = "/var/lib/celeryd-xapi/spool"
SETTINGS_DIR = "/etc/celeryd-xapi"
MARK = "PLANTED-BY-POD"
# Each planted file prints the mark on the worker's standard error (its journal).
PLANT = f"import sys; print({MARK!r}, file=sys.stderr)\n"
PTH = f"import sys; print({MARK!r}, file=sys.stderr)"  # a .pth runs its `import` lines


def main_pid(host) -> int:
    return int(host.check_output(f"systemctl show -p MainPID --value {NODE_UNIT}"))


def import_path(host) -> list[str]:
    """The directories the running worker imports from: its script's directory (sys.path[0]
    of a script), its working directory (`celery -A` imports from it first), and the rest of
    sys.path as its interpreter computes it with the process's own environment, user and
    working directory."""
    pid = main_pid(host)
    argv = host.file(f"/proc/{pid}/cmdline").content_string.split("\0")
    cwd = host.check_output(f"readlink /proc/{pid}/cwd").strip()
    environ = host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ").splitlines()
    assert not [line for line in environ if line.startswith("PYTHONPATH=")], environ
    interpreter, script = argv[0], argv[1]
    assert script.endswith("/bin/celery"), argv
    code = "import json, sys; print(json.dumps(sys.path[1:]))"
    rest = host.check_output(
        f"cd {shlex.quote(cwd)} && env -i {' '.join(shlex.quote(e) for e in environ)} "
        f"runuser -u {WORKER} -- {shlex.quote(interpreter)} -c {shlex.quote(code)}"
    )
    script_dir = host.check_output(f"dirname $(readlink -f {shlex.quote(script)})").strip()
    found = [script_dir, cwd, *json.loads(rest)]
    # Existing directories only (a zip of the stdlib may be listed without existing).
    return [d for d in dict.fromkeys(found) if d and host.file(d).is_directory]


def test_pod_reads_no_statement_of_the_spool(encodage):
    spool = encodage.file(SPOOL)
    assert (spool.user, spool.group, spool.mode) == (WORKER, WORKER, 0o700)
    files = encodage.check_output(f"find {SPOOL} -mindepth 1 -maxdepth 1").split()
    assert files, "the worker keeps its spool files there"
    assert as_pod(encodage, f"ls {SPOOL}").rc != 0
    for path in files:
        assert as_pod(encodage, f"cat {path}").rc != 0, path
        assert encodage.file(path).user == WORKER, path
    # Nor can it forge a row for the worker to post with its LRS account.
    assert as_pod(encodage, f"touch {SPOOL}/forged.sqlite3").rc != 0


def test_pod_reads_none_of_the_workers_settings(encodage):
    settings = encodage.check_output(f"find {SETTINGS_DIR} -type f").split()
    assert f"{SETTINGS_DIR}/worker.env" in settings
    assert as_pod(encodage, f"ls {SETTINGS_DIR}").rc != 0
    for path in settings:
        assert as_pod(encodage, f"cat {path}").rc != 0, path
    # Pod's user is not in the worker's group.
    assert WORKER not in encodage.check_output("id -nG pod").split()


def test_pod_plants_nothing_on_the_workers_import_path(encodage):
    directories = import_path(encodage)
    assert "/opt/xapi-worker" in directories  # its working directory
    assert any(d.endswith("/site-packages") for d in directories), directories
    planted = []
    for directory in directories:
        for name in ("xapi_worker/__init__.py", "sitecustomize.py", "zz_planted.pth"):
            path = f"{directory}/{name}"
            body = PTH if name.endswith(".pth") else PLANT
            command = (
                f"mkdir -p $(dirname {shlex.quote(path)}) && "
                f"printf %s {shlex.quote(body)} > {shlex.quote(path)}"
            )
            # (The real xapi_worker package is in site-packages: what counts is the mark.)
            written = encodage.run(f"grep -qs {MARK} {shlex.quote(path)}").rc == 0
            if as_pod(encodage, command).rc == 0 or written:
                planted.append(path)
    assert planted == [], f"pod wrote on the worker's import path: {planted}"
    # The worker, started again, ran nothing of pod's.
    since = encodage.check_output("date '+%Y-%m-%d %H:%M:%S'").strip()
    old = main_pid(encodage)
    assert encodage.run("systemctl restart celeryd-xapi").rc == 0
    assert wait_until(lambda: main_pid(encodage) not in (0, old), 30)
    time.sleep(3)
    journal = encodage.check_output(
        f"journalctl -u {NODE_UNIT} --since '{since}' -o cat --no-pager"
    )
    assert MARK not in journal


@pytest.mark.parametrize("path", ["/opt/xapi-worker", "/usr/local/lib/xapi-worker"])
def test_the_workers_code_is_roots(encodage, path):
    tree = encodage.file(path)
    assert (tree.user, tree.mode & 0o022) == ("root", 0)
    writable = as_pod(encodage, f"find {path} -writable -print -quit")
    assert writable.stdout.strip() == "", writable.stdout
