"""RunContext: everything a runner may touch while it runs one attempt of one job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
from sqlalchemy.orm import Session

from db import datasets, jobs, registry, shards, submission
from db.engine import session_scope
from db.models import Dataset, Job, ModelVersion
from kiln import job_space
from kiln.broker import Sender
from kiln.errors import JobFailure, NotFound
from kiln.job_files import JobFiles
from workers.reconcile import deadline_reason, time_limit_reason
from workers.runtime import Runtime

#: What a runner reports (progress, log lines, metric points) reaches the database in one
#: transaction at most this often, which also reads the cancellation flag; what is still
#: pending when the attempt ends goes in with its final state.
_THROTTLE_S = 0.5


class JobCancelled(Exception):
    """Raised inside a runner when the user cancelled the job."""


class DeadlinePassed(JobCancelled):
    """Raised inside a runner once the job's own deadline (POST /jobs `deadline_s`) passed:
    the job is cancelled, its error saying so. A JobCancelled, so a runner that tidies up on
    a cancel does the same here."""

    def __init__(self, deadline_s: float) -> None:
        super().__init__(deadline_reason(deadline_s))
        self.reason = deadline_reason(deadline_s)


class ClaimLost(Exception):
    """Raised when another attempt took over this job; this attempt must stop writing."""


class WorkerShutdown(Exception):
    """Raised inside a runner when its worker got SIGTERM: the job goes back to the queue
    without spending an attempt. A checkpointing runner polls ctx.should_stop(), saves a
    checkpoint, then raises this (ctx.raise_if_cancelled() raises it too)."""


class JobPreempted(WorkerShutdown):
    """Raised inside a runner asked to make way for a waiting job of higher priority: like
    WorkerShutdown (a checkpointing runner saves its step, the job is re-queued without
    spending an attempt) but counted as a preemption (workers/preempt.py)."""

    def __init__(self, job_id: str, waiting_job_id: str) -> None:
        super().__init__(job_id)
        self.waiting_job_id = waiting_job_id


class AwaitingShards(Exception):
    """Raised by ctx.start_shards once the job's shards are queued: the attempt ends with
    the job waiting for them (db.shards), holding no worker; nothing more is written."""


@dataclass(frozen=True)
class ShardRows:
    """Which rows of the dataset a shard (a child of a sharded job) scores: [start, stop)."""

    index: int
    start: int
    stop: int


class TransientError(Exception):
    """Raise from a runner for an infrastructure hiccup (a service briefly unreachable):
    the attempt is re-queued with back-off while attempts remain. Never for bad input."""


class RetryableOOM(TransientError):
    """Raise on CUDA out-of-memory when a smaller batch could fit: the job is re-queued and
    the next attempt sees ctx.oom_retries one higher (halve the batch that many times)."""


class JobTimeout(Exception):
    """Raised inside a runner once its attempt ran past the job time limit (the soft limit)."""

    def __init__(self, limit_s: float, reason: str | None = None) -> None:
        super().__init__(reason or time_limit_reason(limit_s))


T = TypeVar("T")

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
    #: What the job's failure says past the deadline (the lane's wording); None: the usual.
    deadline_reason: str | None = None
    #: time.monotonic() past which the job's own deadline (deadline_s) cancels it; None: none.
    expires_at: float | None = None
    #: The job's deadline_s, for the reason its cancellation gives.
    deadline_s: float | None = None
    #: Of a shard (a child job): the rows it scores.
    shard: ShardRows | None = None
    #: Of a sharded job that already split: how many shards (this attempt assembles them).
    split_into: int | None = None
    #: Sends run messages (a sharded job's shards); None where nothing may be sent.
    send: Sender | None = None
    #: Live workers that consume a queue (shards: auto); None where that is unknown.
    live_workers: Callable[[str], int] | None = None
    _next_sync: float = field(default=0.0, repr=False)
    _progress: tuple[float, str] | None = field(default=None, repr=False)
    _lines: list[tuple[str, str]] = field(default_factory=list, repr=False)
    _points: list[tuple[str, int, float]] = field(default_factory=list, repr=False)
    _cancel_requested: bool = field(default=False, repr=False)
    #: The waiting job this attempt was asked to make way for (preemption), if any.
    _preempt_for: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # The claim has just written the job's progress and found no cancel request.
        self._next_sync = time.monotonic() + _THROTTLE_S

    def progress(self, fraction: float, message: str = "", *, force: bool = False) -> None:
        """Report progress (0..1) and a status line; written with the next sync, or at
        once if `force`."""
        self._progress = (fraction, message)
        if force or self.sync_due():
            self.sync()

    def log(self, message: str, level: str = "info") -> None:
        self._lines.append((message, level))
        if self.sync_due():
            self.sync()

    def metrics(self, points: list[tuple[str, int, float]]) -> None:
        """Record metric points (name, step, value); a step reported again overwrites."""
        self._points += points
        if self.sync_due():
            self.sync()

    def sync_due(self) -> bool:
        """Whether the next report is written at once (a runner may then spend time on
        a better status line)."""
        return time.monotonic() >= self._next_sync

    def sync(self) -> None:
        """Write what is pending and read the cancellation flag, in one transaction."""
        progress, self._progress = self._progress, None
        flags: jobs.StopFlags | None
        with session_scope(self.runtime.sessions) as session:
            self._write_reports(session)
            if progress is None:
                flags = jobs.stop_flags(session, self.job_id)
            else:
                flags = jobs.report(session, self.job_id, self.attempt, *progress)
        self._next_sync = time.monotonic() + _THROTTLE_S
        if flags is None:
            raise ClaimLost(self.job_id)
        self._cancel_requested, self._preempt_for = flags

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session for the runner's own writes (and for recording how the attempt
        ended) that carries the reports still pending: they land with it or not at all."""
        with session_scope(self.runtime.sessions) as session:
            self._write_reports(session)
            yield session

    def _write_reports(self, session: Session) -> None:
        # Taken out first: reports a failed transaction could not write are dropped rather
        # than fail every later one (the attempt ends on that error anyway).
        lines, points, self._lines, self._points = self._lines, self._points, [], []
        # Log lines first: writing them locks the job's row (jobs.log_lines), which is
        # better taken before the metric rows' foreign keys share-lock it.
        jobs.log_lines(session, self.job_id, lines)
        jobs.record_metrics(session, self.job_id, points)

    def batch_size(self, requested: int) -> int:
        """The batch size for this attempt: halved once per earlier out-of-memory attempt."""
        return max(1, requested >> self.oom_retries)

    def should_stop(self) -> bool:
        """True once the worker is shutting down (SIGTERM) or the job was preempted:
        checkpoint now, then call raise_if_cancelled() (returning would record success);
        the job is re-queued without spending an attempt and the next attempt resumes from
        the checkpoint."""
        return SHUTDOWN.is_set() or self._preempt_for is not None

    def raise_if_cancelled(self) -> None:
        """Call between steps: raises WorkerShutdown when the worker is stopping, JobTimeout
        past the time limit, DeadlinePassed past the job's own deadline, JobCancelled once
        the user asked to cancel, and JobPreempted once the scheduler asked the job to make
        way for one of higher priority."""
        if SHUTDOWN.is_set():
            raise WorkerShutdown(self.job_id)
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise JobTimeout(self.runtime.settings.job_time_limit_s or 0.0, self.deadline_reason)
        if self.expires_at is not None and now >= self.expires_at:
            raise DeadlinePassed(self.deadline_s or 0.0)
        if now >= self._next_sync:
            self.sync()
        if self._cancel_requested:
            raise JobCancelled(self.job_id)
        if self._preempt_for is not None:
            raise JobPreempted(self.job_id, self._preempt_for)

    @property
    def scratch_dir(self) -> Path:
        """A private working folder for this job (checkpoints, outputs being written)."""
        path = self.scratch_dir_of(self.job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def scratch_dir_of(self, job_id: str) -> Path:
        """Where job `job_id` keeps (or kept) its scratch files; it may not exist."""
        return job_space.scratch_dir(self.runtime.settings.data_dir, job_id)

    def job_files(self, folder: str, job_id: str | None = None) -> JobFiles:
        """This job's (or job `job_id`'s) resumable state in the artifact store: what an
        attempt on any host resumes from. The scratch folder is only this host's cache."""
        return self.runtime.store.job_files(job_id or self.job_id, folder)

    # What a runner reads and writes in the database: the job owner's rows only. The rows
    # come back detached, their columns loaded; a runner only reads them.

    def dataset(self, dataset_id: str) -> Dataset:
        """The owner's uploaded dataset; JobFailure if there is none of that id."""
        with session_scope(self.runtime.sessions) as session:
            try:
                return datasets.get_owned(session, dataset_id, self.owner)
            except NotFound as exc:
                raise JobFailure(exc.message) from None

    def version(self, model: str, ref: str | int) -> ModelVersion:
        """The owner's model `model` at `ref` (number, alias or latest); NotFound if none."""
        with session_scope(self.runtime.sessions) as session:
            return registry.find_version(session, self.owner, model, ref)

    def job(self, job_id: str) -> Job:
        """Another of the owner's jobs; NotFound if there is none of that id."""
        with session_scope(self.runtime.sessions) as session:
            return jobs.get_owned(session, job_id, self.owner)

    def register_version(
        self,
        *,
        name: str,
        arch: str,
        config: dict[str, Any],
        metrics: dict[str, float],
        artifact_digest: str,
        artifact_size: int,
        dataset_digest: str | None,
        lineage: dict[str, Any],
        family: str = "zoo",
        task: str | None = None,
    ) -> int:
        """Register the version this job made as the next of the owner's model `name` (a
        job registers at most one), with the reports still pending; returns its number."""
        with self.transaction() as session:
            version = registry.register_version(
                session,
                owner=self.owner,
                name=name,
                source_job_id=self.job_id,
                arch=arch,
                config=config,
                metrics=metrics,
                artifact_digest=artifact_digest,
                artifact_size=artifact_size,
                dataset_digest=dataset_digest,
                lineage=lineage,
                family=family,
                task=task,
            )
            return version.number

    def record_export(self, version_id: str, fmt: str, digest: str, size: int) -> None:
        """Note an export on a version; JobFailure if the version was deleted meanwhile."""
        with session_scope(self.runtime.sessions) as session:
            try:
                registry.record_export(session, version_id, fmt, digest, size)
            except NotFound as exc:
                raise JobFailure(exc.message) from None

    def attach_result(self, result: dict[str, Any]) -> None:
        """Record part of the result before the attempt ends (a failing job's error file)."""
        with session_scope(self.runtime.sessions) as session:
            jobs.attach_result(session, self.job_id, self.attempt, result)

    # Sharded jobs: the attempt that splits the job queues its shards and ends; a later
    # attempt reads what they made (db.shards).

    def start_shards(self, spec: dict[str, Any], ranges: list[tuple[int, int]]) -> NoReturn:
        """Queue one child job of `spec` per row range, in one transaction with this job's
        move to awaiting them (and the reports still pending), send their messages, and end
        the attempt (AwaitingShards). JobCancelled (or JobPreempted) if that was asked for
        meanwhile; ClaimLost if another attempt holds the job."""
        if self.send is None:
            raise RuntimeError("this context cannot send messages: no shards can start")
        with self.transaction() as session:
            parent = session.get_one(Job, self.job_id)
            children = shards.fan_out(session, parent, self.attempt, spec, ranges)
            if children is not None:
                session.commit()
                for child in children:  # a failed send leaves it to the reconciler
                    submission.commit_and_send(session, self.send, child)
        if children is None:
            self.sync()  # reads the flags; raises ClaimLost if the job is no longer ours
            self.raise_if_cancelled()
            raise ClaimLost(self.job_id)
        raise AwaitingShards(self.job_id)

    def shard_jobs(self) -> list[Job]:
        """This job's shards, in order."""
        with session_scope(self.runtime.sessions) as session:
            found = shards.children(session, self.job_id)
            session.expunge_all()
            return found

    # Dynamic batching: jobs claimed to run alongside this one (its followers) are finished
    # by this attempt; db.jobs holds the claims and the endings.

    def claim_followers(
        self, take: Callable[[Job], T | None], size: Callable[[T], int], budget: int, limit: int
    ) -> list[tuple[str, int, T]]:
        """Claim queued jobs of this job's owner and kind that `take` accepts, up to
        `budget` in `size`; (job id, attempt, what `take` gave) each."""
        with session_scope(self.runtime.sessions) as session:
            return jobs.claim_followers(
                session, self.job_id, str(self.device), take, size, budget=budget, limit=limit
            )

    def finish_followers(self, endings: list[tuple[str, int, dict[str, Any] | str]]) -> None:
        """Record the followers' endings in one transaction: a result, or why it failed."""
        with session_scope(self.runtime.sessions) as session:
            jobs.finish_followers(session, self.job_id, endings)

    def fail_followers(self, held: list[tuple[str, int]], error_type: str, message: str) -> None:
        with session_scope(self.runtime.sessions) as session:
            for job_id, attempt in held:
                jobs.fail(session, job_id, attempt, error_type, message)
