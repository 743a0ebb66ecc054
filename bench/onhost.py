"""Code the benchmark runs on the lab hosts: Pod's own producer and the direct batched
ingest on the frontal (as user pod, Pod's venv and settings_local.py, through
xapi_testsupport.pod_on_host), the LRS store, and the workers' memory."""

from __future__ import annotations

import datetime as dt
import json

from labhosts import PodmanHost
from xapi_testsupport import statements
from xapi_testsupport.pod_on_host import as_pod_python, lrs_auth  # shared with the molecule tests

# Statements of Pod's video player (w3id video profile), numbered; used by both producers.
# The shared builder's own source goes along: the hosts make thousands, too many to pass.
STATEMENT = (
    statements.source()
    + """
import json, sys, time
BENCH_VERBS = ["initialized", "played", "paused", "seeked", "completed", "terminated"]
def numbered(i):
    verb = BENCH_VERBS[i % len(BENCH_VERBS)]
    return statement(
        verb,
        verb_id=VIDEO + "/verbs/" + verb,
        actor=agent("bench", "mailto:bench@example.org", typed=False),
        object_id="https://pod.example.org/video/%04d-bench/" % (i % 50),
        result={"extensions": {EXT + "time": float(i)}},
        context=video_context(),
        timestamp="2026-01-01T00:00:00+00:00",
    )
"""
)
# Pod's frontal: send_xapi_statement_task.delay() as pod/xapi/views.py calls it. Prints
# [[id, enqueue time], ...].
PRODUCE = (
    STATEMENT
    + """
from pod.xapi.xapi_tasks import send_xapi_statement_task
sent = []
for i in range(int(sys.argv[1])):
    s = numbered(i)
    sent.append([s["id"], time.time()])
    send_xapi_statement_task.delay(s)
print(json.dumps(sent))
"""
)
# The ceiling: no queue, batches POSTed straight to the LRS from the frontal. A statement's
# time is when it is made, so its latency includes waiting for its batch, as in a worker.
DIRECT = (
    STATEMENT
    + """
import requests
from pod.custom import settings_local as s
# The frontal holds no LRS credentials (roles/xapi_frontal): they come on stdin.
auth = json.load(sys.stdin)
session = requests.Session()
session.auth = (auth["login"], auth["password"])
session.headers["X-Experience-API-Version"] = "1.0.3"
n, size = int(sys.argv[1]), int(sys.argv[2])
sent, batch = [], []
for i in range(n):
    st = numbered(i)
    sent.append([st["id"], time.time()])
    batch.append(st)
    if len(batch) == size or i == n - 1:
        session.post(s.XAPI_LRS_URL, json=batch, timeout=120).raise_for_status()
        batch = []
print(json.dumps(sent))
"""
)
QUEUE_LENGTH = """
import redis
from pod.custom import settings_local as s
print(redis.Redis.from_url(s.XAPI_CELERY_BROKER_URL).llen("xapi"))
"""
PURGE = """
import redis
from xapi_worker.settings import load_settings
print(redis.Redis.from_url(load_settings().broker_url).delete("xapi"))
"""
STORE = "/var/lib/ralph/statements/fs_lrs.jsonl"
HISTORY = "/var/lib/ralph/history.json"
HEARTBEAT = """
import socket, time, urllib.request
url = "http://%s:8100/__heartbeat__" % socket.gethostbyname(socket.gethostname())
for _ in range(120):
    try:
        urllib.request.urlopen(url, timeout=2)
        break
    except OSError:
        time.sleep(0.25)
else:
    raise SystemExit("Ralph does not answer " + url)
"""


def on_pod(host: PodmanHost, code: str, *args: str, stdin: str = "") -> str:
    result = as_pod_python(host, code, *args, stdin=stdin)
    if result.rc != 0:
        raise RuntimeError(f"{host.container}: {result.stderr[-3000:]}")
    return result.stdout


def produce(frontal: PodmanHost, n: int) -> list[tuple[str, float]]:
    return [(i, t) for i, t in json.loads(on_pod(frontal, PRODUCE, str(n)))]


def direct(frontal: PodmanHost, n: int, batch: int) -> list[tuple[str, float]]:
    auth = json.dumps(lrs_auth())
    return [(i, t) for i, t in json.loads(on_pod(frontal, DIRECT, str(n), str(batch), stdin=auth))]


def queue_length(frontal: PodmanHost) -> int:
    return int(on_pod(frontal, QUEUE_LENGTH))


def purge_queue(encodage: PodmanHost) -> None:
    """Drops what a run left queued (a time-boxed run of a slow configuration). On an
    encoding host, as the worker's user with its settings (the worker's broker user); the
    frontal's name Pod's producer, which may not delete the queue (roles/xapi_broker README)."""
    encodage.check(
        "cd /opt/xapi-worker && runuser -u xapi-worker -- env "
        "XAPI_WORKER_CONFIG=/etc/celeryd-xapi/worker.env "
        f"/opt/xapi-worker/bin/python -c '{PURGE}'"
    )


def reset_lrs(lrs: PodmanHost) -> None:
    """Empties Ralph's store and history: its FS backend re-reads the store (and rewrites the
    history) on every request, so each run must start from the same empty LRS."""
    lrs.check(f"systemctl stop ralph-lrs && rm -f {STORE} {HISTORY} && systemctl start ralph-lrs")
    lrs.check(f"python3 -c '{HEARTBEAT}'")


def stored_count(lrs: PodmanHost) -> int:
    out = lrs.run(f"[ -f {STORE} ] && wc -l < {STORE} || echo 0").stdout.strip()
    return int(out or 0)


def stored_times(lrs: PodmanHost) -> dict[str, float]:
    """Statement id -> Ralph's `stored` stamp (same kernel clock as the frontal's)."""
    times = {}
    for line in lrs.check(f"cat {STORE}").splitlines():
        if line.strip():
            doc = json.loads(line)
            times[doc["id"]] = dt.datetime.fromisoformat(doc["stored"]).timestamp()
    return times


def worker_rss_kib(host: PodmanHost) -> int:
    """Sum of the resident memory of the host's Celery worker processes (main + pool)."""
    out = host.run("ps -eo rss=,args=").stdout
    return sum(
        int(line.split(None, 1)[0])
        for line in out.splitlines()
        if "celery" in line and " worker" in line
    )


# CPU seconds of the bundled worker's processes, from /proc: every process in a
# celeryd-xapi@ unit's cgroup (the lab host's Pod encoding worker is not counted). "main" is
# the Celery main process (consumer, transport); "pool" its pool processes, with the CPU of
# pool processes it has reaped. The host's cgroup v1 gives containers no per-unit cpuacct.
WORKER_CPU = """
import json, os
tick = os.sysconf("SC_CLK_TCK")
procs = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            if "/celeryd-xapi@" not in f.read():
                continue
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    procs[int(pid)] = (int(fields[1]), [int(v) for v in fields[11:15]])
main = pool = 0
for pid, (ppid, (utime, stime, cutime, cstime)) in procs.items():
    if ppid in procs:
        pool += utime + stime
    else:
        main += utime + stime
        pool += cutime + cstime
print(json.dumps({"main": main / tick, "pool": pool / tick, "processes": len(procs)}))
"""
SPOOL_DEPTH = """
import glob, sqlite3
total = 0
for path in glob.glob("/var/lib/celeryd-xapi/spool/*.sqlite3"):
    conn = sqlite3.connect(path, timeout=30)
    total += conn.execute("SELECT count(*) FROM spool").fetchone()[0]
    conn.close()
print(total)
"""


def worker_cpu(host: PodmanHost) -> dict[str, float]:
    """CPU seconds used so far by the bundled worker's main and pool processes on a host."""
    return json.loads(host.check(f"python3 -c '{WORKER_CPU}'"))


def spool_depth(host: PodmanHost) -> int:
    """Statements in the spools of the host's nodes (read as the worker's user)."""
    return int(host.check(f"runuser -u xapi-worker -- python3 -c '{SPOOL_DEPTH}'").strip() or 0)


def stop_lrs(lrs: PodmanHost) -> None:
    """Ralph stopped, its store and history emptied for when it comes back."""
    lrs.check(f"systemctl stop ralph-lrs && rm -f {STORE} {HISTORY}")


def start_lrs(lrs: PodmanHost) -> None:
    lrs.check("systemctl start ralph-lrs")
    lrs.check(f"python3 -c '{HEARTBEAT}'")
