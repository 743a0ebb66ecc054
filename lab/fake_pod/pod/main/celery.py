"""Lab stand-in for Pod 4.1.0's pod/main/celery.py: the app of Pod's encoding tasks.

Upstream builds Celery("pod_project") and configures it with config_from_object on Django's
settings, namespace CELERY (so CELERY_BROKER_URL, CELERY_TASK_ACKS_LATE...); the stand-in
has no Django and reads the same names from settings_local.py, the same way. Its tasks go to
queue "celery", which the remote encoding hosts' workers consume (Pod's remote-encoding doc).
"""

from celery import Celery

from pod.custom import settings_local

app = Celery("pod_project")
app.config_from_object(settings_local, namespace="CELERY")
app.conf.task_routes = {"pod.main.tasks.*": {"queue": "celery"}}
app.conf.imports = ("pod.main.tasks",)
