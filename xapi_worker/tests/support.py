"""Processes the integration tests start: redis-server, Ralph's LRS, a recording/fault proxy in
front of Ralph, Celery workers of this package, and a producer built like Pod's. Polling and
the statements come from xapi_testsupport (testsupport/README.md), shared with the bundle's
other tests and the benchmark."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from xapi_testsupport.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TASK_NAME = "pod.xapi.xapi_tasks.send_xapi_statement_task"
LRS_USER = "pod-lrs"
LRS_PASSWORD = "s3cret-Lrs-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Local processes answer within milliseconds: poll ten times as often as on the lab hosts.
wait_for = functools.partial(wait_until, interval=0.1)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


# --- Redis ---------------------------------------------------------------------------------
class RedisServer:
    def __init__(self, workdir: Path, durable: bool = False, *extra: str) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True)
        self.args = [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            # durable: what it holds survives restart() (an AOF, fsync'd always).
            "--appendonly",
            "yes" if durable else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.dir),
            "--maxmemory-policy",
            "noeviction",
            *extra,
        ]
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert wait_for(lambda: _port_open(self.port), 10), "redis-server did not start"

    def restart(self) -> None:
        """Stopped and started again on the same port, as systemctl restart does."""
        self.stop()
        self._start()

    def url(self, db: int = 6) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 6) -> Any:
        import redis

        return redis.Redis.from_url(self.url(db))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# --- Ralph ---------------------------------------------------------------------------------
def ralph_venv() -> Path:
    return Path(os.environ.get("RALPH_VENV", REPO / ".venv-ralph"))


def ralph_env(auth_file: Path, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RALPH_RUNSERVER_BACKEND="fs",
        RALPH_AUTH_FILE=str(auth_file),
        RALPH_BACKENDS__LRS__FS__DEFAULT_DIRECTORY_PATH=str(data_dir),
        # Ralph's FS backend rewrites a history of every read and write: by default one file
        # of the user's (~/.config/ralph/history.json), shared by every Ralph running at once
        # (tests run side by side), which they corrupt (then every POST answers 500).
        RALPH_HISTORY_FILE=str(data_dir.parent / f"{data_dir.name}-history.json"),
        PYTHONPATH=str(REPO / "roles" / "ralph_lrs" / "files"),
        # Ralph appends every POST to a history file in its application directory (under
        # XDG_CONFIG_HOME): one per test, not the user's, which concurrent runs corrupt.
        XDG_CONFIG_HOME=str(data_dir.parent / "ralph-config"),
    )
    return env


def make_ralph_auth(workdir: Path) -> Path:
    auth = workdir / "auth.json"
    data = workdir / "unused-data"
    data.mkdir(exist_ok=True)
    subprocess.run(
        [
            str(ralph_venv() / "bin" / "ralph"),
            "auth",
            "-u",
            LRS_USER,
            "-p",
            LRS_PASSWORD,
            "-s",
            "all",
            "-M",
            "mailto:lrs-tests@example.org",
            "-w",
        ],
        env=ralph_env(auth, data),
        check=True,
        capture_output=True,
        timeout=60,
    )
    return auth


class Ralph:
    def __init__(self, workdir: Path, auth_file: Path) -> None:
        self.port = free_port()
        self.data = workdir / "ralph-data"
        self.data.mkdir(exist_ok=True)
        self.auth_file = auth_file
        self.log = workdir / "ralph.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/xAPI/statements/"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(ralph_venv() / "bin" / "uvicorn"),
                    "ralph_lrs_app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--no-access-log",
                ],
                env=ralph_env(self.auth_file, self.data),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        assert wait_for(self._healthy, 30), "Ralph did not start: " + self.log.read_text()[-2000:]

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            conn.request("GET", "/__heartbeat__")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None

    def stored(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for path in self.data.glob("*.jsonl"):
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            for n, line in enumerate(lines):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    if n < len(lines) - 1:
                        raise
                    # the last line, which Ralph is still writing: read at the next look
        return out

    def stored_ids(self) -> list[str]:
        return [s["id"] for s in self.stored()]

    def post(self, statements: list[dict[str, Any]]) -> int:
        """POST straight to Ralph (not through the worker); returns the HTTP status."""
        import base64

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        token = base64.b64encode(f"{LRS_USER}:{LRS_PASSWORD}".encode()).decode()
        conn.request(
            "POST",
            "/xAPI/statements/",
            body=json.dumps(statements),
            headers={
                "Authorization": f"Basic {token}",
                "Content-Type": "application/json",
                "X-Experience-API-Version": "1.0.3",
            },
        )
        status = conn.getresponse().status
        conn.close()
        return status


# --- a proxy in front of the LRS: records requests, can delay or answer by itself ----------
@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Proxy:
    upstream_port: int
    delay: float = 0.0
    force_status: int | None = None
    #: answers a request itself when it returns (status, headers, body); None: upstream
    respond: Callable[[Recorded], tuple[int, dict[str, str], bytes] | None] | None = None
    requests: list[Recorded] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    def start(self) -> Proxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded = Recorded(self.command, self.path, dict(self.headers.items()), body)
                proxy.requests.append(recorded)
                own = proxy.respond(recorded) if proxy.respond is not None else None
                if own is not None:
                    status, headers, payload = own
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if proxy.delay:
                    time.sleep(proxy.delay)
                if proxy.force_status is not None:
                    payload = json.dumps({"detail": "forced by the test proxy"}).encode()
                    self.send_response(proxy.force_status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = _handle
            do_POST = _handle
            do_PUT = _handle

        Handler.protocol_version = "HTTP/1.1"
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/xAPI/statements/"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# --- configuration and workers ---------------------------------------------------------------
def write_config(path: Path, values: dict[str, Any]) -> Path:
    lines = ["# written by the tests"]
    for key, value in values.items():
        lines.append(f'{key}="{value}"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o640)
    return path


def local_worker_config(path: Path, broker_url: str, lrs_url: str, **settings: Any) -> Path:
    """A worker settings file for the test LRS user, as the benchmarks write them."""
    values: dict[str, Any] = {
        "XAPI_LRS_URL": lrs_url,
        "XAPI_LRS_LOGIN": LRS_USER,
        "XAPI_LRS_PWD": LRS_PASSWORD,
        "XAPI_CELERY_BROKER_URL": broker_url,
    }
    return write_config(path, {**values, **settings})


def worker_env(config: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XAPI_")}
    env["XAPI_WORKER_CONFIG"] = str(config)
    env.update(extra or {})
    return env


class Worker:
    def __init__(
        self,
        workdir: Path,
        config: Path,
        name: str,
        concurrency: int = 1,
        app: str = "xapi_worker.app",
        extra_env: dict[str, str] | None = None,
        wait_ready: bool = True,
    ) -> None:
        self.log = workdir / f"worker-{name}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(VENV_BIN / "celery"),
                    "-A",
                    app,
                    "worker",
                    "-Q",
                    "xapi",
                    "-n",
                    f"{name}@%h",
                    "--concurrency",
                    str(concurrency),
                    "-l",
                    "INFO",
                ],
                env=worker_env(config, extra_env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not wait_ready:
            return
        assert wait_for(lambda: " ready." in self.text() or self.proc.poll() is not None, 30)
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def run_cli(
    config: Path, *args: str, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "xapi-worker"), *args],
        env=worker_env(config, extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- Pod's producer, rebuilt: same app name, routes, task name and call ---------------------
@contextlib.contextmanager
def pod_producer(broker_url: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    from celery import Celery

    app = Celery("xapi_tasks", broker=broker_url)
    app.conf.task_routes = {"pod.xapi.xapi_tasks.*": {"queue": "xapi"}}

    @app.task(name=TASK_NAME)
    def send_xapi_statement_task(statement: dict[str, Any]) -> None:  # never run here
        raise AssertionError("the producer must not run the task")

    try:
        yield send_xapi_statement_task.delay
    finally:
        app.close()


# --- the nodes' dead letters on disk (deadstore.py) ------------------------------------------
def disk_dead_letters(spool_dir: Path | str) -> list[dict[str, Any]]:
    """Every dead letter kept in the spool files of ``spool_dir``, file by file, oldest first."""
    from xapi_worker.deadstore import DiskDeadLetters
    from xapi_worker.spool import Spool

    found: list[dict[str, Any]] = []
    for path in sorted(Path(spool_dir).glob("*.sqlite3")):
        spool = Spool(path.parent, path.name.removesuffix(".sqlite3"))
        try:
            found.extend(entry for _, entry in DiskDeadLetters(spool, 1 << 40).entries())
        finally:
            spool.close()
    return found
