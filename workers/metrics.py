"""Worker metrics for Prometheus: attempts finished, their durations, rows, model cache, GPUs.

Celery runs jobs in pool processes, so the counters are kept in prometheus_client's
multiprocess files: the launcher (`kiln worker`) points PROMETHEUS_MULTIPROC_DIR at one
folder for all the workers of its host and serves that folder, plus GPU readings taken
through NVML at scrape time, on settings.metrics_port. One scrape target per host, with a
`worker` label (gpu0@host, cpu0@host) on each series.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Task, signals
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from kiln import routing
from kiln.settings import Settings
from kiln.states import TERMINAL_STATES, JobState

log = logging.getLogger(__name__)

JOBS = Counter(
    "kiln_worker_jobs",
    "Job attempts this worker finished, by kind and final state.",
    ["worker", "kind", "state"],
)
DURATION = Histogram(
    "kiln_job_duration_seconds",
    "Run time of finished attempts (claim to final state), by kind and state.",
    ["kind", "state"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600),
)
ROWS = Counter(
    "kiln_worker_rows",
    "Rows scored or processed, from each finished job's result (rate() gives rows/s).",
    ["worker", "kind"],
)
BUSY = Counter("kiln_worker_busy_seconds", "Seconds this worker spent running jobs.", ["worker"])
MODEL_CACHE = Counter(
    "kiln_model_cache_requests",
    "Model loads asked of the worker's model cache, by result (hit or miss).",
    ["worker", "result"],
)
LAST_FINISHED = Gauge(
    "kiln_worker_last_job_finished_timestamp_seconds",
    "Unix time this worker last finished a job.",
    ["worker"],
    multiprocess_mode="max",
)


def record_model_cache(worker: str, hit: bool) -> None:
    """For the model cache to call on each lookup."""
    MODEL_CACHE.labels(worker, "hit" if hit else "miss").inc()


#: When each run task in this process started, by task id (prerun to postrun).
_task_started: dict[str, datetime] = {}


@signals.task_prerun.connect
def _on_task_start(task_id: str, task: Task, **_: Any) -> None:
    if task.name == routing.RUN_TASK:
        _task_started[task_id] = datetime.now(UTC)


@signals.task_postrun.connect
def _on_task_done(task_id: str, task: Task, args: tuple[Any, ...] | None = None, **_: Any) -> None:
    """After each run task, record how its job ended (read back from the database)."""
    started = _task_started.pop(task_id, None)
    if task.name != routing.RUN_TASK or not args or started is None:
        return
    try:
        observe_job(str(args[0]), task.request.hostname or "unknown", since=started)
    except Exception:  # metrics must never break job work
        log.exception("event=metrics_failed job=%s", args[0])


def observe_job(job_id: str, worker: str, since: datetime) -> None:
    """Count one attempt of `job_id` if this worker finished it after `since` (a duplicate
    message for a job that had already finished counts nothing)."""
    from db.engine import session_scope
    from db.models import Job
    from workers.runtime import runtime

    with session_scope(runtime().sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.worker != worker or JobState(job.state) not in TERMINAL_STATES:
            return  # a stale message, or a job handed back to the queue
        kind, state, result = job.kind, job.state, job.result or {}
        started, finished = job.started_at, job.finished_at
    if finished is None or finished < since:
        return
    JOBS.labels(worker, kind, state).inc()
    if started is not None:
        seconds = max(0.0, (finished - started).total_seconds())
        DURATION.labels(kind, state).observe(seconds)
        BUSY.labels(worker).inc(seconds)
        LAST_FINISHED.labels(worker).set(finished.timestamp())
    if rows := rows_of(result):
        ROWS.labels(worker, kind).inc(rows)


def rows_of(result: dict[str, Any]) -> int:
    """Rows a job handled, as its result reports them ("rows", or one per prediction)."""
    rows = result.get("rows")
    if isinstance(rows, int):
        return rows
    predictions = result.get("predictions")
    return len(predictions) if isinstance(predictions, list) else 0


class GpuCollector(Collector):
    """Utilisation and memory of each GPU through NVML (nvidia-ml-py); nothing without one."""

    def collect(self) -> Iterator[Metric]:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:
            return  # no nvidia-ml-py or no driver: a CPU host reports no GPU series
        utilisation = GaugeMetricFamily(
            "kiln_gpu_utilization_ratio", "GPU busy fraction over the last sample.", labels=["gpu"]
        )
        used = GaugeMetricFamily("kiln_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily(
            "kiln_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"]
        )
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                utilisation.add_metric([str(index)], rates.gpu / 100)
                used.add_metric([str(index)], memory.used)
                total.add_metric([str(index)], memory.total)
        finally:
            pynvml.nvmlShutdown()
        yield from (utilisation, used, total)


def prepare_dir(settings: Settings) -> Path:
    """An empty multiprocess folder for this host's workers (old processes' files removed)."""
    path = settings.prometheus_dir / "worker"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def serve(settings: Settings, multiproc_dir: Path) -> int:
    """Serve the workers' multiprocess metrics and GPU readings; returns the port bound."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc_dir))
    registry.register(GpuCollector())
    server, _thread = start_http_server(
        settings.metrics_port, addr=settings.host, registry=registry
    )
    port = int(server.server_address[1])
    log.info("event=metrics_serving port=%d", port)
    return port
