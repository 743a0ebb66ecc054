"""``python3 -m xapi_worker.check``: check_xapi."""

from .cli import entry

entry()
