"""Celery application module: ``celery -A xapi_worker.app worker -Q xapi ...``.

Settings are read at import; a missing or malformed one stops the process here with a message
naming it and exit status 3 (EX_CONFIG-like), before Celery connects anywhere.
"""

from __future__ import annotations

import sys

from .cli import Exit
from .settings import SettingsError, load_settings
from .worker import make_celery, register_task

try:
    settings = load_settings()
except SettingsError as _exc:
    print(f"xapi-worker: configuration error: {_exc}", file=sys.stderr)
    raise SystemExit(int(Exit.CONFIG)) from None

app = make_celery(settings)
send_xapi_statement_task = register_task(app, settings)

__all__ = ["app", "send_xapi_statement_task", "settings"]
