"""The Celery app that workers run: `celery -A workers.main worker` (the launcher does this)."""

import logging
from typing import Any

from celery import signals

from kiln import logs
from kiln.broker import make_celery
from kiln.settings import Settings
from workers import malloc

malloc.configure()  # before pyarrow is imported (below) and the pool forks
settings = Settings()
celery = make_celery(settings)


@signals.setup_logging.connect
def _configure_logging(loglevel: int | None = None, **_: Any) -> None:
    """Kiln's log format (JSON lines off a terminal, with the job on each line) over Celery's."""
    logs.configure(settings.log_format, loglevel or logging.INFO)


import workers.metrics  # noqa: E402  (counts finished jobs for Prometheus)
import workers.tasks  # noqa: E402, F401  (registers the tasks on this app)
