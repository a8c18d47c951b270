"""Celery tasks: thin, named, JSON arguments only (ids, never objects)."""

from __future__ import annotations

import functools

from celery import Task, shared_task

from kiln import routing
from kiln.broker import celery_sender
from workers import live_workers, shutdown
from workers.execute import execute_attempt
from workers.runtime import runtime


@shared_task(name=routing.RUN_TASK, bind=True)
def run_job(self: Task, job_id: str, attempt: int) -> None:
    """Run one attempt of a job; everything it does is recorded on the job row."""
    send = celery_sender(self.app)
    worker = self.request.hostname or "unknown"
    serving = functools.partial(live_workers.serving, self.app)
    with shutdown.sigterm_stops_the_job():
        execute_attempt(runtime(), job_id, attempt, worker, send, serving)
