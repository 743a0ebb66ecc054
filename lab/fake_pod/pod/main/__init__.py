"""Lab stand-in for Pod 4.1.0's pod/main package: its Celery app, as upstream exposes it."""

from .celery import app as celery_app

__all__ = ["celery_app"]
