"""Send a job's id to the broker, by task name, after its row is committed.

The web never imports workers/ (nor torch): it names the task and the queue, nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery
from flask import Flask, current_app

from db.models import Job
from kiln.broker import make_celery, send_run
from kiln.settings import Settings

Sender = Callable[[Job], None]
log = logging.getLogger(__name__)


def init_app(app: Flask, settings: Settings, sender: Sender | None) -> None:
    if sender is None:
        celery = make_celery(settings)
        app.extensions["kiln.celery"] = celery
        sender = lambda job: send_run(celery, job.id, job.attempt, job.queue, job.priority)  # noqa: E731
    app.extensions["kiln.sender"] = sender


def send_job(job: Job) -> bool:
    """Enqueue the job; call only after the row that holds it is committed. True if sent.

    If this fails (the broker is down), the job stays queued in the database and the
    reconciler sends it again: the row, not the message, is the record of the request.
    """
    try:
        current_app.extensions["kiln.sender"](job)
    except Exception:
        log.exception("job=%s event=send_failed (the reconciler will send it again)", job.id)
        return False
    return True


def broker_reachable() -> bool:
    celery: Celery | None = current_app.extensions.get("kiln.celery")
    if celery is None:
        return True
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception:
        return False
    return True
