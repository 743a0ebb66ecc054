from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    LRS_PASSWORD,
    LRS_USER,
    Ralph,
    RedisServer,
    Worker,
    make_ralph_auth,
    ralph_venv,
    write_config,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if (ralph_venv() / "bin" / "uvicorn").exists():
        return
    skip = pytest.mark.skip(reason=f"no Ralph venv at {ralph_venv()} (set RALPH_VENV)")
    for item in items:
        if "ralph" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ralph_auth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ralph_auth(tmp_path_factory.mktemp("ralph-auth"))


@pytest.fixture
def redis_srv(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def ralph(tmp_path: Path, ralph_auth: Path) -> Iterator[Ralph]:
    lrs = Ralph(tmp_path, ralph_auth)
    yield lrs
    lrs.stop()


@pytest.fixture
def make_config(tmp_path: Path, redis_srv: RedisServer) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(lrs_url: str, **overrides: Any) -> Path:
        values: dict[str, Any] = {
            "XAPI_LRS_URL": lrs_url,
            "XAPI_LRS_LOGIN": LRS_USER,
            "XAPI_LRS_PWD": LRS_PASSWORD,
            "XAPI_CELERY_BROKER_URL": redis_srv.url(),
            "XAPI_WORKER_BATCH_SIZE": 100,
            "XAPI_WORKER_FLUSH_INTERVAL_MS": 200,
            "XAPI_WORKER_CONNECT_TIMEOUT": 1,
            "XAPI_WORKER_READ_TIMEOUT": 5,
            "XAPI_WORKER_RETRY_BASE_SECONDS": 0.2,
            "XAPI_WORKER_RETRY_MAX_SECONDS": 1,
            "XAPI_WORKER_VISIBILITY_TIMEOUT": 30,
        }
        values.update(overrides)
        return write_config(tmp_path / f"worker-{next(counter)}.env", values)

    return make


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []
    counter = iter(range(1000))

    def start(
        config: Path, concurrency: int = 1, name: str | None = None, **options: Any
    ) -> Worker:
        worker = Worker(tmp_path, config, name or f"w{next(counter)}", concurrency, **options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
