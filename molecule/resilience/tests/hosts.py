"""The scenario's hosts, reached with `podman exec` (stdin passes through, which testinfra's
backend does not offer), and what the tests read from them."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

# Pod's layout on the lab hosts and its venv's python as pod, as the other scenarios know
# them (xapi_testsupport, on sys.path through molecule/pytest.ini).
from xapi_testsupport.pod_on_host import POD_DIR, POD_PYTHON
from xapi_testsupport.polling import wait_until
from xapi_testsupport.worker_on_host import as_worker_command

PREFIX = os.environ.get("XAPI_RES_PREFIX", "res-")
FILES = Path(__file__).resolve().parents[1] / "files"
WORK = "/var/tmp/xapi-resilience"  # on the frontal, owned by pod
LRS_STORE = "/var/lib/ralph/statements"
WORKER_ENV = "/etc/celeryd-xapi/worker.env"
HOSTS = ("frontal", "encodage", "lrs")


def container(host: str) -> str:
    return PREFIX + host


def sh(
    host: str, script: str, *, check: bool = True, timeout: float = 120, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", "exec", "-i", container(host), "sh", "-c", script],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{host}: `{script}` exited {result.returncode}: {result.stderr}")
    return result


def copy_to(host: str, source: Path, dest: str) -> None:
    subprocess.run(["podman", "cp", str(source), f"{container(host)}:{dest}"], check=True)


def pod_python(script: str, *args: str) -> str:
    """Command line running a script as user pod with Pod's venv and settings (frontal)."""
    return f"cd {POD_DIR} && {POD_PYTHON} {script} {' '.join(args)}"


def lrs_store_ids() -> Counter[str]:
    """Every statement id in Ralph's store files, with the number of times it is stored."""
    text = sh("lrs", f"cat {LRS_STORE}/* 2>/dev/null || true").stdout
    ids: Counter[str] = Counter()
    for line in text.splitlines():
        if line.strip():
            ids[json.loads(line)["id"]] += 1
    return ids


def worker_broker_url() -> str:
    """The worker's broker URL as seen from the frontal (its own instance, over loopback):
    user and port from roles/xapi defaults, the password from the lab's settings. Pod's
    settings on the frontal hold the producer's, which may not read the broker's state."""
    import yaml

    root = Path(__file__).resolve().parents[3]
    defaults = yaml.safe_load((root / "roles/xapi/defaults/main.yml").read_text())
    values = yaml.safe_load((root / "inventories/lab/group_vars/all/xapi.yml").read_text())
    user = quote(defaults["xapi_broker_user"], safe="")
    password = quote(values["xapi_broker_password"], safe="")
    port, db = defaults["xapi_broker_port"], defaults["xapi_broker_db"]
    return f"redis://{user}:{password}@127.0.0.1:{port}/{db}"


def broker_state(*args: str) -> dict:
    """Queue length, unacknowledged messages and dead letters, read on the frontal with the
    worker's user (its URL on stdin)."""
    out = sh("frontal", pod_python(f"{WORK}/broker_state.py", *args), stdin=worker_broker_url())
    return json.loads(out.stdout)


def produced(progress: str = f"{WORK}/progress.tsv") -> list[tuple[float, str, int]]:
    """(enqueue time, id, refused attempts) of every statement the producer enqueued so far
    (files/producer.py's progress file)."""
    text = sh("frontal", f"cat {progress} 2>/dev/null || true").stdout
    rows = []
    for line in text.splitlines():
        stamp, statement_id, refused = line.split("\t")
        rows.append((float(stamp), statement_id, int(refused)))
    return rows


def service_active(host: str, unit: str) -> bool:
    return sh(host, f"systemctl is-active {unit}", check=False).stdout.strip() == "active"


def main_pid(host: str, unit: str) -> str:
    return sh(host, f"systemctl show -p MainPID --value {unit}").stdout.strip()


def host_booted(host: str) -> bool:
    state = sh(host, "systemctl is-system-running", check=False).stdout.strip()
    return state in ("running", "degraded")


def secrets() -> dict[str, str]:
    """The lab passwords the scenario runs with (inventories/lab/group_vars/all/xapi.yml)."""
    import yaml

    root = Path(__file__).resolve().parents[3]
    values = yaml.safe_load((root / "inventories/lab/group_vars/all/xapi.yml").read_text())
    return {
        "LRS password": values["xapi_lrs_password"],
        "Redis password (xapi user)": values["xapi_broker_password"],
        "Redis password (producer user)": values["xapi_broker_producer_password"],
        "Redis password (default user)": values["xapi_broker_admin_password"],
        "Redis password (monitor user)": values["xapi_broker_monitor_password"],
    }


def redis_admin(*args: str) -> str:
    """redis-cli on the frontal against the xAPI instance, as its default (administrator)
    user, the password on stdin (never in argv)."""
    port = lab_settings()["xapi_broker_port"]
    return sh(
        "frontal",
        f"read -r REDISCLI_AUTH && export REDISCLI_AUTH && redis-cli --user default -p {port} "
        + " ".join(args),
        stdin=secrets()["Redis password (default user)"] + "\n",
    ).stdout


def acl_log() -> list[dict[str, Any]]:
    """The xAPI instance's ACL LOG (denied commands, keys, channels and failed logins)."""
    entries = json.loads(redis_admin("--json", "ACL", "LOG", "128"))
    # RESP3 (redis-cli --json) gives maps; RESP2 flat key/value arrays.
    return [e if isinstance(e, dict) else dict(zip(e[::2], e[1::2], strict=True)) for e in entries]


def lab_settings() -> dict[str, Any]:
    """The lab's settings with the roles' default port (inventories/lab, roles/xapi)."""
    import yaml

    root = Path(__file__).resolve().parents[3]
    values = yaml.safe_load((root / "roles/xapi/defaults/main.yml").read_text())
    values.update(yaml.safe_load((root / "inventories/lab/group_vars/all/xapi.yml").read_text()))
    return values


def all_dead_letters(state: dict) -> dict[str, dict]:
    """Every dead letter by statement id (id, reason, status): the broker's list (``state``,
    broker_state()) and what the worker keeps on its disk (spool on), as `xapi-worker
    dead-letters list` gives them."""
    command = as_worker_command(
        f"env XAPI_WORKER_CONFIG={WORKER_ENV} /opt/xapi-worker/bin/xapi-worker dead-letters list",
        cwd="/opt/xapi-worker",
    )
    dead = {d["id"]: d for d in state["dead"]}
    # A failed listing (the host restarting) counts none from the disk this time: the
    # callers poll again.
    result = sh("encodage", command, check=False)
    for line in (result.stdout if result.returncode == 0 else "").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        statement = entry.get("statement") if isinstance(entry, dict) else None
        if isinstance(statement, dict) and isinstance(statement.get("id"), str):
            dead.setdefault(
                statement["id"],
                {
                    "id": statement["id"],
                    "reason": entry.get("reason") or "",
                    "status": entry.get("status"),
                },
            )
    return dead


def wait_settled(everything: set[str], timeout: float) -> float:
    """Waits until every id is in Ralph's store or in the dead letters and nothing waits in
    the broker (queue, unacked, in-flight lists) or in the nodes' spools. Returns when the
    last of them settled (epoch seconds)."""
    progress = {"settled": 0, "at": time.time()}

    def settled() -> bool:
        state = broker_state()
        done = everything & (set(all_dead_letters(state)) | set(lrs_store_ids()))
        if len(done) > progress["settled"]:
            progress.update(settled=len(done), at=time.time())
        waiting = state["queue"] or state["unacked"] or state["in_flight"] or state["spooled"]
        return done == everything and not waiting

    wait_until(settled, timeout, 5)
    return progress["at"]


def assert_accounted(
    valid: set[str], invalid: set[str], stored: Counter[str], dead: dict[str, dict]
) -> None:
    """Each valid statement stored once and not dead-lettered; each invalid one refused by the
    LRS and dead-lettered with its answer."""
    duplicates = {i: n for i, n in stored.items() if n > 1 and i in valid | invalid}
    assert not duplicates, f"stored more than once: {list(duplicates.items())[:5]}"
    assert not invalid & set(stored), "the LRS stored a statement it must refuse"
    assert invalid <= set(dead), f"{len(invalid - set(dead))} invalid statements not dead-lettered"
    assert not valid & set(dead), "valid statements dead-lettered"
    for statement_id in invalid:
        entry = dead[statement_id]
        assert entry["status"] in (400, 422) and "rejected by the LRS" in entry["reason"], entry
