"""What the bundle must leave as it was on a Pod host, as JSON (lab and tests only).

Run as root with the system's python3: Pod's Redis and encoding-worker configuration files
(byte-for-byte checksums), Pod's services (main process and start time, which change on any
restart), Pod's own Celery processes, the commit of Pod's checkout and the packages of Pod's
venv (pip freeze), both read as user pod,
and, on a host with Pod's Redis, its data (pod_redis_state.py, as user pod with Pod's venv).
lab/prepare.yml keeps the first snapshot in /var/lib/xapi-lab/site-before.json; the tests
take another after site.yml and compare.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

POD_DIR = "/usr/local/django_projects/podv4"
VENV = "/home/pod/.virtualenvs/django_pod4"
FILES = [
    "/etc/redis/redis.conf",
    "/etc/default/redis-server",
    "/lib/systemd/system/redis-server.service",
    "/etc/default/celeryd",
    "/etc/init.d/celeryd",
]
SERVICES = ["redis-server.service", "uwsgi-pod.service", "celeryd.service"]


def checksum(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def service(name: str) -> dict:
    shown = subprocess.run(
        ["systemctl", "show", "--property=ActiveState,MainPID,ExecMainStartTimestamp", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def pod_workers() -> list[str]:
    """Pod's own Celery processes (its encoding worker, `--app=pod.main`): pid and start."""
    found = []
    for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                started = f.read().rsplit(")", 1)[1].split()[19]
        except OSError:
            continue
        if b"--app=pod.main" in args or b"pod.main" in args:
            found.append(f"{pid}@{started}")
    return found


def pod_venv() -> list[str] | None:
    """The packages of Pod's venv (pip freeze, run as pod)."""
    if not os.path.exists(f"{VENV}/bin/python"):
        return None
    out = subprocess.run(
        ["runuser", "-u", "pod", "--", f"{VENV}/bin/python", "-m", "pip", "freeze", "--all"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout
    return sorted(out.split())


def pod_checkout() -> str | None:
    """The commit Pod's checkout is at (git rev-parse HEAD, run as pod)."""
    if not os.path.exists(f"{POD_DIR}/.git"):
        return None
    return subprocess.run(
        ["runuser", "-u", "pod", "--", "git", "-C", POD_DIR, "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.strip()


def redis_data() -> object:
    if checksum("/etc/redis/redis.conf") is None:
        return None
    out = subprocess.run(
        ["runuser", "-u", "pod", "--", f"{VENV}/bin/python", sys.argv[1]],
        capture_output=True,
        text=True,
        check=True,
        cwd=POD_DIR,
    ).stdout
    return json.loads(out)


print(
    json.dumps(
        {
            "files": {path: checksum(path) for path in FILES},
            "services": {name: service(name) for name in SERVICES},
            "redis": redis_data(),
            "pod_workers": pod_workers(),
            "pod_venv": pod_venv(),
            "pod_checkout": pod_checkout(),
        },
        sort_keys=True,
    )
)
