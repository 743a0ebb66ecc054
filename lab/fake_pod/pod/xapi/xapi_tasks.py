"""Lab stand-in for Esup-Pod 4.1.0's pod/xapi/xapi_tasks.py, written from its description in
docs/upstream-facts.md §1.4.

It behaves like upstream on purpose, defects included: one POST per statement, no xAPI
version header, no timeout, no retry, any answer but 200 is logged and the statement lost.
The bundle's tests use it as "Pod's own task module" and as the frontal's producer.
"""

import logging

import requests
from celery import Celery

try:
    from pod.custom import settings_local as settings
except ImportError:  # upstream falls back to the whole Pod settings here
    from pod import settings

XAPI_LRS_URL = getattr(settings, "XAPI_LRS_URL", "")
XAPI_LRS_LOGIN = getattr(settings, "XAPI_LRS_LOGIN", "")
XAPI_LRS_PWD = getattr(settings, "XAPI_LRS_PWD", "")
XAPI_CELERY_BROKER_URL = getattr(settings, "XAPI_CELERY_BROKER_URL", "")

logger = logging.getLogger(__name__)

xapi_app = Celery("xapi_tasks", broker=XAPI_CELERY_BROKER_URL)
xapi_app.conf.task_routes = {"pod.xapi.xapi_tasks.*": {"queue": "xapi"}}


@xapi_app.task
def send_xapi_statement_task(statement: dict) -> None:
    # No timeout, no version header: upstream's defects, reproduced on purpose.
    response = requests.post(  # noqa: S113
        XAPI_LRS_URL, json=statement, auth=(XAPI_LRS_LOGIN, XAPI_LRS_PWD)
    )
    if response.status_code != 200:
        logger.error("statement not sent: %s %s", response.status_code, response.text)
