"""The raw-Celery baseline for queue_overhead.py: a minimal app with one no-op task.

The worker runs it as `celery -A raw_celery worker` (bench/ on PYTHONPATH); the broker and
the result backend are both KILN_BENCH_REDIS_URL, the Redis the Kiln side of the benchmark
uses. Nothing of Kiln is imported: this is what plain Celery costs on the same machine.
"""

from __future__ import annotations

import os

from celery import Celery

QUEUE = "bench-noop"


def make_app(redis_url: str) -> Celery:
    app = Celery("bench_raw", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    app.task(name="bench.noop")(noop)
    return app


def noop() -> None:
    """Does nothing: the round trip measures Celery and Redis alone."""


#: The worker's import target; the URL is only read when a process imports this module.
app = make_app(os.environ.get("KILN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
