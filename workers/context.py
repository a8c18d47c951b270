"""RunContext: everything a runner may touch while it runs one attempt of one job."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from db import jobs
from db.engine import session_scope
from workers.reconcile import time_limit_reason
from workers.runtime import Runtime

#: Progress and cancellation checks reach the database at most this often.
_THROTTLE_S = 0.5


class JobCancelled(Exception):
    """Raised inside a runner when the user cancelled the job."""


class ClaimLost(Exception):
    """Raised when another attempt took over this job; this attempt must stop writing."""


class WorkerShutdown(Exception):
    """Raised inside a runner when its worker got SIGTERM: the job goes back to the queue
    without spending an attempt. A checkpointing runner polls ctx.should_stop(), saves a
    checkpoint, then raises this (ctx.raise_if_cancelled() raises it too)."""


class TransientError(Exception):
    """Raise from a runner for an infrastructure hiccup (a service briefly unreachable):
    the attempt is re-queued with back-off while attempts remain. Never for bad input."""


class RetryableOOM(TransientError):
    """Raise on CUDA out-of-memory when a smaller batch could fit: the job is re-queued and
    the next attempt sees ctx.oom_retries one higher (halve the batch that many times)."""


class JobTimeout(Exception):
    """Raised inside a runner once its attempt ran past the job time limit (the soft limit)."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(time_limit_reason(limit_s))


#: Set in a worker's pool process when it got SIGTERM (workers.shutdown installs the
#: handler); read by every RunContext of that process.
SHUTDOWN = threading.Event()


@dataclass
class RunContext:
    job_id: str
    attempt: int
    owner: str
    device: torch.device
    runtime: Runtime
    #: The Celery worker running the attempt (gpu0@host): the label on its metrics.
    worker: str = "unknown"
    #: Attempts of this job that ended in RetryableOOM: halve the batch this many times.
    oom_retries: int = 0
    #: time.monotonic() past which the soft time limit raises JobTimeout; None: no limit.
    deadline: float | None = None
    _last_progress: float = field(default=0.0, repr=False)
    _last_cancel_check: float = field(default=0.0, repr=False)

    def progress(self, fraction: float, message: str = "", *, force: bool = False) -> None:
        """Report progress (0..1) and a status line; throttled unless `force`."""
        now = time.monotonic()
        if not force and now - self._last_progress < _THROTTLE_S:
            return
        self._last_progress = now
        with session_scope(self.runtime.sessions) as session:
            held = jobs.report_progress(session, self.job_id, self.attempt, fraction, message)
        if not held:
            raise ClaimLost(self.job_id)

    def metric(self, name: str, step: int, value: float) -> None:
        with session_scope(self.runtime.sessions) as session:
            jobs.record_metric(session, self.job_id, name, step, float(value))

    def log(self, message: str, level: str = "info") -> None:
        with session_scope(self.runtime.sessions) as session:
            jobs.log(session, self.job_id, message, level)

    def batch_size(self, requested: int) -> int:
        """The batch size for this attempt: halved once per earlier out-of-memory attempt."""
        return max(1, requested >> self.oom_retries)

    def should_stop(self) -> bool:
        """True once the worker is shutting down (SIGTERM): checkpoint now, then raise
        WorkerShutdown (returning would record success); the job is re-queued without
        spending an attempt and the next attempt resumes from the checkpoint."""
        return SHUTDOWN.is_set()

    def raise_if_cancelled(self) -> None:
        """Call between steps: raises WorkerShutdown when the worker is stopping, JobTimeout
        past the time limit, and JobCancelled once the user asked to cancel."""
        if SHUTDOWN.is_set():
            raise WorkerShutdown(self.job_id)
        now = time.monotonic()
        limit = self.runtime.settings.job_time_limit_s
        if self.deadline is not None and limit is not None and now >= self.deadline:
            raise JobTimeout(limit)
        if now - self._last_cancel_check < _THROTTLE_S:
            return
        self._last_cancel_check = now
        with session_scope(self.runtime.sessions) as session:
            cancelled = jobs.is_cancel_requested(session, self.job_id)
        if cancelled:
            raise JobCancelled(self.job_id)

    @property
    def scratch_dir(self) -> Path:
        """A private working folder for this job (checkpoints, outputs being written)."""
        path = self.runtime.settings.data_dir / "work" / self.job_id
        path.mkdir(parents=True, exist_ok=True)
        return path
