"""The Celery app that workers run: `celery -A workers.main worker` (the launcher does this)."""

import gc
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


@signals.worker_process_init.connect
def _freeze_startup_objects(**_: Any) -> None:
    """Hide every object a pool process starts with (torch, SQLAlchemy, the app: about
    450,000) from the cyclic garbage collector. A full collection otherwise walks them all,
    a 0.1-0.25 s pause that lands in whatever job is running; frozen, it walks only what
    the jobs made. Python's docs advise it for processes forked from a warm parent."""
    gc.freeze()


@signals.setup_logging.connect
def _configure_logging(loglevel: int | None = None, **_: Any) -> None:
    """Kiln's log format (JSON lines off a terminal, with the job on each line) over Celery's."""
    logs.configure(settings.log_format, loglevel or logging.INFO)


import workers.metrics  # noqa: E402  (counts finished jobs for Prometheus)
import workers.tasks  # noqa: E402, F401  (registers the tasks on this app)
