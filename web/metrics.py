"""GET /metrics for Prometheus: the web's requests, and the job system as the database and
the broker see it.

Request counters live in prometheus_client; under gunicorn (`kiln web` sets
PROMETHEUS_MULTIPROC_DIR) every gunicorn worker writes them to shared files and any one of
them answers a scrape with the sum. Job counts, queue ages and heartbeats are read from the
database at scrape time, and queue depths from the broker, both cached for a few seconds,
so every web process reports the same numbers whichever answers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from celery import Celery
from flask import Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, Row, func, select

from db.base import utcnow
from db.models import Job
from kiln import presence, routing
from kiln.broker import queue_length
from kiln.states import TERMINAL_STATES, JobState

#: How long one reading of the database and the broker serves scrapes.
CACHE_S = 5.0

REQUESTS = Counter(
    "kiln_http_requests",
    "HTTP requests answered, by route template (not raw path) and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "kiln_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def init_app(app: Flask) -> None:
    """Time every request and serve /metrics (outside the API: no key; guard it by network)."""
    app.before_request(_start_timer)
    app.after_request(_count)
    collector = JobSystemCollector(
        app.extensions["kiln.engine"], app.extensions.get("kiln.celery"), CACHE_S
    )
    app.extensions["kiln.metrics"] = collector
    app.add_url_rule("/metrics", "metrics", _metrics)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _count(response: Response) -> Response:
    started = g.pop("metrics_started", None)
    # The rule, not the path: one series per route, however many job ids are asked about.
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    if started is not None:
        LATENCY.labels(request.method, route).observe(time.perf_counter() - started)
    return response


def _metrics() -> Response:
    collector: JobSystemCollector = current_app.extensions["kiln.metrics"]
    own = CollectorRegistry(auto_describe=False)
    own.register(collector)
    body = generate_latest(_process_registry()) + generate_latest(own)
    return Response(body, content_type=CONTENT_TYPE_LATEST)


def _process_registry() -> CollectorRegistry:
    """Every gunicorn worker's counters when they share a multiprocess dir, else this one's."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


class JobSystemCollector(Collector):
    """Jobs by kind and state, queue ages and depths, the stalest heartbeat: read at scrape."""

    def __init__(self, engine: Engine, celery: Celery | None, cache_s: float) -> None:
        self.engine = engine
        self.celery = celery
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] = (-float("inf"), [])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            taken, metrics = self._cached
            if time.monotonic() - taken >= self.cache_s:
                metrics = self._read()
                self._cached = (time.monotonic(), metrics)
        yield from metrics

    def _read(self) -> list[Metric]:
        with self.engine.connect() as connection:
            counts = connection.execute(
                select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
            ).all()
            queued = connection.execute(
                select(Job.queue, func.min(Job.created_at))
                .where(Job.state == JobState.QUEUED)
                .group_by(Job.queue)
            ).all()
            stalest = connection.execute(
                select(func.min(Job.heartbeat_at)).where(Job.state == JobState.RUNNING)
            ).scalar()
        now = utcnow()
        metrics = _job_counts(counts)
        metrics.append(_queue_ages(queued, now))
        running = GaugeMetricFamily(
            "kiln_running_job_heartbeat_age_max_seconds",
            "Seconds since the stalest running job's heartbeat (0 when nothing runs); "
            "past KILN_HEARTBEAT_TIMEOUT_S its worker is presumed lost.",
        )
        running.add_metric([], _age(stalest, now) if stalest is not None else 0.0)
        metrics.append(running)
        if self.celery is not None:
            metrics.extend(_broker_depths(self.celery, [q for q, _ in queued]))
        return metrics


def _job_counts(counts: Sequence[Row[str, str, int]]) -> list[Metric]:
    submitted = CounterMetricFamily(
        "kiln_jobs_submitted", "Jobs ever submitted, by kind (from the database).", labels=["kind"]
    )
    finished = CounterMetricFamily(
        "kiln_jobs_finished",
        "Jobs that reached a final state, by kind and state (from the database).",
        labels=["kind", "state"],
    )
    active = GaugeMetricFamily(
        "kiln_jobs_active", "Jobs queued or running now, by kind.", labels=["kind", "state"]
    )
    by_kind: dict[str, int] = {}
    for kind, state, count in counts:
        by_kind[kind] = by_kind.get(kind, 0) + count
        family = finished if JobState(state) in TERMINAL_STATES else active
        family.add_metric([kind, state], count)
    for kind, count in sorted(by_kind.items()):
        submitted.add_metric([kind], count)
    return [submitted, finished, active]


def _queue_ages(queued: Sequence[Row[str, datetime]], now: datetime) -> Metric:
    ages = GaugeMetricFamily(
        "kiln_queue_oldest_job_age_seconds",
        "How long the oldest queued job of each queue has waited (queues with waiting jobs).",
        labels=["queue"],
    )
    for queue, oldest in queued:
        ages.add_metric([queue], _age(oldest, now))
    return ages


def _broker_depths(celery: Celery, queues_in_use: list[str]) -> list[Metric]:
    """`kiln_queue_depth` for the shared queues (always, 0 when empty: an autoscaler reads
    a series that exists), the queues of queued jobs, and every queue a live worker
    consumes (its own gpu.<n>, gpu.x<N>)."""
    depth = GaugeMetricFamily(
        "kiln_queue_depth",
        "Messages waiting in each broker queue, all priorities (for autoscalers).",
        labels=["queue"],
    )
    up = GaugeMetricFamily("kiln_broker_up", "1 when the broker answered the last reading.")
    shared = (routing.CPU_QUEUE, routing.GPU_QUEUE, *routing.INTERACTIVE_QUEUES)
    try:
        with celery.connection_for_read() as connection:
            # Fail fast when Redis is down: a scrape must not hang on reconnect attempts.
            connection.ensure_connection(max_retries=1, timeout=2)
            consumed = _consumed_queues(connection)
        names = sorted({*shared, *queues_in_use, *consumed})
        for name in names:
            depth.add_metric([name], queue_length(celery, name))
    except Exception:
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    return [depth, up]


def _consumed_queues(connection: Any) -> list[str]:
    """The queues live workers consume, from their presence records in Redis; none on a
    broker that is not Redis (the in-memory one of tests and single-process runs)."""
    client = getattr(connection.default_channel, "client", None)
    if client is None:
        return []
    return [q for w in presence.live(client) for q in w.queues]


def _age(then: datetime, now: datetime) -> float:
    return max(0.0, (now - then).total_seconds())
