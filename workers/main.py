"""The Celery app that workers run: `celery -A workers.main worker` (the launcher does this)."""

import gc
import logging
import os
from typing import Any

from celery import signals
from celery.apps import worker as celery_worker_app

from kiln import logs
from kiln.broker import celery_sender, make_celery
from kiln.settings import Settings
from workers import malloc
from workers.presence import PresenceBeat, record_for

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


@signals.celeryd_init.connect
def _configure_logging_early(**_: Any) -> None:
    """Kiln's format from the worker program's start, before Celery's own set-up: its
    privilege check's SecurityWarning (root in a container) is a log line too."""
    logs.configure(settings.log_format)


@signals.setup_logging.connect
def _configure_logging(loglevel: int | None = None, **_: Any) -> None:
    """Kiln's log format (JSON lines off a terminal, with the job on each line) over Celery's."""
    logs.configure(settings.log_format, loglevel or logging.INFO)


def _say_through_logging(message: str, *_: Any) -> None:
    """Celery prints its shutdown notices ("worker: Warm shutdown") straight to stdout with
    `safe_say`; as log records they take Kiln's format like every other line."""
    logging.getLogger("celery.apps.worker").info("%s", message.strip())


celery_worker_app.safe_say = _say_through_logging


#: This worker's presence record (kiln.presence), from its set-up to its shutdown.
_presence: dict[str, PresenceBeat] = {}


@signals.celeryd_after_setup.connect
def _log_started(sender: str, instance: Any, **_: Any) -> None:
    """What Celery's banner said (the launcher runs it with --quiet), as one log line."""
    queues = ",".join(sorted(instance.app.amqp.queues.consume_from or {}))
    logging.getLogger(__name__).info(
        "event=worker_started hostname=%s queues=%s concurrency=%s pid=%d",
        sender, queues, instance.concurrency, os.getpid(),
    )  # fmt: skip
    # In the order the worker takes them (consume_from is a dict in that order).
    ordered = list(instance.app.amqp.queues.consume_from or {})
    _presence["beat"] = PresenceBeat(celery, record_for(sender, ordered, instance.concurrency))


@signals.worker_ready.connect
def _announce(**_: Any) -> None:
    """List this worker in GET /api/v1/workers once it takes messages."""
    if "beat" in _presence:
        _presence["beat"].start()


@signals.worker_shutdown.connect
def _withdraw(**_: Any) -> None:
    beat = _presence.pop("beat", None)
    if beat is not None:
        beat.stop()


import workers.metrics  # noqa: E402  (counts finished jobs for Prometheus)
import workers.tasks  # noqa: E402, F401  (registers the tasks on this app)
from workers import reconcile  # noqa: E402
from workers.runtime import runtime  # noqa: E402


@signals.worker_process_init.connect
def _recover_what_a_lost_process_ran(sender: str, **_: Any) -> None:
    """A pool process of this worker starts: if the worker runs one job at a time, what the
    database still records as running on it was left by a process that died (workers.
    reconcile.recover_lost_process). The scheduler recovers it later if this fails."""
    beat = _presence.get("beat")  # set up before the pool forks
    if beat is None or beat.record.concurrency != 1:
        return
    try:
        counts = reconcile.recover_lost_process(
            runtime().sessions, settings, celery_sender(celery), sender
        )
    except Exception:
        logging.getLogger(__name__).exception("event=recover_lost_process_failed")
        return
    if any(counts.values()):
        logging.getLogger(__name__).warning(
            "event=recovered_lost_process %s", " ".join(f"{k}={v}" for k, v in counts.items())
        )
