"""The dead letters in their two places, side by side: a node's disk (its spool file,
xapi_worker's deadstore.py) and the broker's list (``XAPI_WORKER_DEAD_LETTER_KEY``, where
they were kept before, and where a node without a spool still keeps them).

For each place, in one run: N dead letters written one at a time, as a batch's settling
writes them (``DiskDeadLetters.add`` of one entry: a transaction, committed to disk;
``RedisAccess.add``: one script call), the size they take (the spool file and its WAL, and
what the store counts against ``XAPI_WORKER_DEAD_LETTER_MAX_MB``; the list's ``MEMORY
USAGE`` in the broker), then the operator's commands, timed from the shell as run:
``xapi-worker dead-letters list``, ``replay`` (the statements published onto the queue,
which is emptied afterwards), the letters written again, ``purge --yes``; each with
``--where disk --node NODE`` or ``--where broker``. ``xapi-worker dead-letters list`` on no
dead letter at all gives the command's own start.

No worker may run on the broker meanwhile: a node with a spool would move the broker's list
to its disk. The node's file is a bench node's of its own (``NODE``), removed at the end.

On the encoding host of ``make bench`` (phase ``dead``, bench/pipeline.py), as the worker's
user with its settings (``XAPI_WORKER_CONFIG``); on loopback, with a redis-server and a spool
directory of its own (``--local``). ``BENCH_REDIS_ADMIN_PASSWORD_FILE``: a file holding the
broker's admin password (user ``default``), for ``MEMORY USAGE``:

    PYTHONPATH=testsupport:xapi_worker/tests .venv-worker/bin/python bench/dead_letters.py \\
        --local --n 5000

Prints the results as one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from xapi_worker.deadletters import DeadLetter, RedisAccess
from xapi_worker.deadstore import DiskDeadLetters, disk_dead_letters
from xapi_worker.names import QUEUE
from xapi_worker.settings import Settings, load_settings
from xapi_worker.spool import Spool

#: The bench's own node: its spool file holds the disk's dead letters of the run.
NODE = "bench-dead@bench"
#: What a refused statement's dead letter says of the LRS's answer (Ralph's 400, shortened).
RESPONSE = (
    '{"detail":[{"type":"missing","loc":["body","actor"],"msg":"Field required",'
    '"input":{"id":"...","verb":{"id":"http://adlnet.gov/expapi/verbs/played"}}}]}'
)


def letters(statement: dict[str, Any], n: int) -> list[DeadLetter]:
    """N dead letters of refused statements, each with its own statement id."""
    return [
        DeadLetter(
            statement={**statement, "id": str(uuid.uuid4())},
            reason="the LRS refused this statement (HTTP 400)",
            task_id=str(uuid.uuid4()),
            status=400,
            response=RESPONSE,
            attempts=1,
        )
        for _ in range(n)
    ]


def timed(*args: str) -> float:
    """Seconds an ``xapi-worker dead-letters`` command takes, its output discarded."""
    command = Path(sys.executable).with_name("xapi-worker")
    started = time.perf_counter()
    subprocess.run(
        [str(command), "dead-letters", *args], stdout=subprocess.DEVNULL, check=True, timeout=3600
    )
    return round(time.perf_counter() - started, 3)


def file_bytes(spool: Spool) -> int:
    """The spool file and its WAL, as they are on disk."""
    return sum(p.stat().st_size for p in (spool.path, Path(f"{spool.path}-wal")) if p.exists())


def write(store: DiskDeadLetters, access: RedisAccess, batch: list[DeadLetter]) -> dict[str, float]:
    """Each dead letter written alone, as Settler.write_dead_letter writes it; seconds per place."""
    store.spool.open()
    try:
        started = time.perf_counter()
        for letter in batch:
            store.add([letter.entry()])
        disk = time.perf_counter() - started
    finally:
        store.spool.close()
    started = time.perf_counter()
    for letter in batch:
        access.add(letter)
    broker = time.perf_counter() - started
    return {"disk": round(disk, 3), "broker": round(broker, 3)}


def counts(store: DiskDeadLetters, access: RedisAccess) -> tuple[int, int]:
    try:
        disk = store.stats(counts=False).count
    finally:
        store.spool.close()
    return disk, int(access.client.llen(access.key))  # type: ignore[arg-type]


def measure(
    settings: Settings, n: int, statement: dict[str, Any], admin: str | None
) -> dict[str, Any]:
    access = RedisAccess(settings)
    client = access.client
    if client.llen(access.key) or client.llen(QUEUE):
        raise SystemExit(f"{access.key} and {QUEUE} must be empty before the run")
    spool = Spool(settings.spool_dir, NODE, settings.spool_max_mb * 1024**2, settings.batch_size)
    if spool.path.exists():
        raise SystemExit(f"{spool.path} exists: a run that did not end?")
    store = disk_dead_letters(spool, settings)
    where = {"disk": ["--where", "disk", "--node", NODE], "broker": ["--where", "broker"]}
    batch = letters(statement, n)
    out: dict[str, Any] = {
        "n": n,
        "entry_bytes": len(json.dumps(batch[0].entry(), separators=(",", ":"))),
        "command_start_s": timed("list", "--where", "disk", "--node", "nobody@none"),
    }
    try:
        out["write_s"] = write(store, access, batch)
        stats = store.stats(counts=False)
        spool.close()
        out["size"] = {
            "disk_file_bytes": file_bytes(spool),
            "disk_counted_bytes": stats.bytes,
            "broker_memory_bytes": broker_memory(admin, access.key),
            "broker_element_bytes": sum(
                len(raw)
                for raw in client.lrange(access.key, 0, -1)  # type: ignore[union-attr]
            ),
        }
        if counts(store, access) != (n, n):
            raise SystemExit(f"written: {counts(store, access)}, not {n} in each place")
        out["list_s"] = {place: timed("list", *args) for place, args in where.items()}
        out["replay_s"] = {}
        for place, args in where.items():
            out["replay_s"][place] = timed("replay", *args)
            queued = int(client.llen(QUEUE))  # type: ignore[arg-type]
            if queued != n:
                raise SystemExit(f"replay from the {place}: {queued} queued, not {n}")
            client.delete(QUEUE)
        if counts(store, access) != (0, 0):
            raise SystemExit(f"left after the replays: {counts(store, access)}")
        out["write_again_s"] = write(store, access, batch)
        out["purge_s"] = {place: timed("purge", "--yes", *args) for place, args in where.items()}
        if counts(store, access) != (0, 0):
            raise SystemExit(f"left after the purges: {counts(store, access)}")
        spool.close()
        out["size"]["disk_file_bytes_purged"] = file_bytes(spool)
    finally:
        spool.close()
        for path in spool.directory.glob(f"{spool.path.name}*"):
            path.unlink()
    return out


def admin_url(broker_url: str, password: str) -> str:
    """The broker's URL with its admin user (``default``) instead of the worker's."""
    parts = urlsplit(broker_url)
    netloc = f"default:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def broker_memory(admin: str | None, key: str) -> int | None:
    """The list's ``MEMORY USAGE`` in the broker (all its elements), as its admin user."""
    if not admin:
        return None
    import redis

    client = redis.Redis.from_url(admin)
    try:
        return int(client.memory_usage(key, samples=0) or 0)
    finally:
        client.close()


@contextlib.contextmanager
def local() -> Iterator[str]:
    """A redis-server of its own, the worker's settings in the environment (spool on, in a
    temporary directory); yields the broker's URL (no ACL: also the admin's)."""
    from support import RedisServer, local_worker_config

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = RedisServer(work)
        try:
            spool_dir = work / "spool"
            spool_dir.mkdir(mode=0o700)
            config = local_worker_config(
                work / "worker.env",
                server.url(),
                "http://127.0.0.1:9/xAPI/statements",
                XAPI_WORKER_SPOOL_DIR=spool_dir,
            )
            os.environ["XAPI_WORKER_CONFIG"] = str(config)
            yield server.url()
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--statement", type=Path, help="a statement (JSON) each letter copies")
    parser.add_argument("--local", action="store_true", help="a redis-server of its own")
    args = parser.parse_args()
    if args.statement:
        statement = json.loads(args.statement.read_text())
    else:
        from xapi_testsupport.statements import video_statement

        statement = video_statement("played", 7)
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(local()) if args.local else None
        settings = load_settings()
        password_file = os.environ.get("BENCH_REDIS_ADMIN_PASSWORD_FILE")
        if password_file:
            admin = admin_url(settings.broker_url, Path(password_file).read_text().strip())
        result = measure(settings, args.n, statement, admin)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
