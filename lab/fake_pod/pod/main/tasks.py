"""Lab stand-in for Pod's encoding task: "encodes" a video for an hour (a real encoding takes
minutes to hours), logging when it starts and ends, so that the lab's encoding host has an
encoding in progress while the bundle runs."""

import logging
import time

from pod.main.celery import app

logger = logging.getLogger(__name__)


@app.task
def task_start_encode(video_id: int) -> None:
    logger.info("encoding video %s", video_id)
    time.sleep(3600)
    logger.info("encoded video %s", video_id)
