"""One attempt of one job: claim it, run its kind's runner, record how it ended.

How an attempt ends, and what it costs the job:
- returns → succeeded; JobFailure or any unexpected exception → failed at once (bad input
  or a bug: retrying would fail the same way);
- TransientError / RetryableOOM / a database or Redis disconnect → re-queued with
  exponential back-off while attempts remain (the attempt counts), then failed;
- WorkerShutdown (SIGTERM) → re-queued at once, the attempt refunded (shutdown_attempts);
- JobPreempted (a waiting job of higher priority) → the same, counted in `preemptions`;
- JobTimeout (soft limit) or Celery's SoftTimeLimitExceeded → failed with the limit;
- DeadlinePassed (the job's own deadline_s) → cancelled, its error saying so; a job whose
  deadline passed while it waited is cancelled before it is claimed;
- the process dies (SIGKILL, OOM killer, Celery's hard time limit) → nothing is written
  here; the heartbeat stops and the reconciler re-queues or fails the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from billiard.exceptions import SoftTimeLimitExceeded
from celery.exceptions import Reject
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, OperationalError

from db import jobs, shards, submission
from db.base import utcnow
from db.engine import session_scope
from db.models import Job
from kiln import logs
from kiln.broker import Sender
from kiln.errors import InvalidSpec, JobFailure, NotFound
from kiln.specs import parse_spec
from kiln.states import JobState
from workers import lanes
from workers.context import (
    SHUTDOWN,
    AwaitingShards,
    ClaimLost,
    DeadlinePassed,
    JobCancelled,
    JobPreempted,
    JobTimeout,
    RetryableOOM,
    RunContext,
    ShardRows,
    TransientError,
    WorkerShutdown,
)
from workers.reconcile import deadline_reason
from workers.runners import RUNNERS
from workers.runtime import Runtime

log = logging.getLogger(__name__)


def execute_attempt(
    runtime: Runtime,
    job_id: str,
    queued_attempt: int,
    worker: str,
    send: Sender,
    live_workers: Callable[[str], int] | None = None,
) -> None:
    """Run the job if this message still stands for it; a stale or duplicate message is
    dropped by the claim, so a job never runs twice at once. `live_workers` counts the
    live workers consuming a queue (for a sharded job's `shards: auto`)."""
    if SHUTDOWN.is_set():
        # This pool process is stopping: hand the message back rather than start a job.
        raise Reject("worker is shutting down", requeue=True)
    with session_scope(runtime.sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job=%s event=dropped reason=unknown_job", job_id)
            return
        if job.state != JobState.QUEUED or job.attempt != queued_attempt:
            # Already taken (by a batch leader, say) or finished: the claim would refuse it,
            # so skip parsing and the UPDATE; this is the common path under dynamic batching.
            log.info("job=%s attempt=%d event=dropped reason=stale_message", job_id, queued_attempt)
            return
        kind, owner, oom_retries, queue = job.kind, job.owner, job.oom_retries, job.queue
        deadline_s, deadline_at = job.deadline_s, job.deadline_at
        if deadline_s is not None and deadline_at is not None and utcnow() >= deadline_at:
            reason = deadline_reason(deadline_s)
            if jobs.expire(session, job_id, None, reason):
                jobs.log(session, job_id, f"cancelled: {reason} before it started", "warning")
            return
        parent_id, split_into = job.parent_id, job.shard_count
        shard = None
        if parent_id is not None:
            shard = ShardRows(job.shard_index or 0, job.row_start or 0, job.row_stop or 0)
        try:
            spec = parse_spec(kind, job.spec)
            device = runtime.device_for(spec.device)
        except (InvalidSpec, JobFailure) as exc:
            jobs.fail(session, job_id, None, type(exc).__name__, str(exc))
            return
        attempt = jobs.claim(session, job_id, queued_attempt, worker, str(device))
    if attempt is None:
        log.info("job=%s attempt=%d event=dropped reason=stale_message", job_id, queued_attempt)
        return
    limit = lanes.attempt_time_limit(runtime.settings, queue)
    ctx = RunContext(
        job_id=job_id,
        attempt=attempt,
        owner=owner,
        device=device,
        runtime=runtime,
        worker=worker,
        oom_retries=oom_retries,
        deadline=time.monotonic() + limit.seconds if limit else None,
        deadline_reason=limit.reason if limit else None,
        expires_at=_monotonic_at(deadline_at),
        deadline_s=deadline_s,
        shard=shard,
        split_into=split_into,
        send=send,
        live_workers=live_workers,
    )
    tags = {"job_id": job_id, "kind": kind, "attempt": attempt, "worker": worker}
    with logs.job_fields(**tags, device=str(device)), _heartbeats(runtime, job_id, attempt):
        log.info("job=%s attempt=%d event=claimed device=%s", job_id, attempt, device)
        _run(ctx, kind, spec, send)
        if parent_id is not None:
            _settle_parent(runtime, send, job_id, parent_id)


def _settle_parent(runtime: Runtime, send: Sender, job_id: str, parent_id: str) -> None:
    """A shard's attempt ended: move its sharded job on if this was its last shard (or a
    failed one). If this fails, the reconciler settles the parent on its next sweep."""
    try:
        with session_scope(runtime.sessions) as session:
            outcome = shards.settle(session, send, parent_id)
    except Exception:
        log.exception("job=%s event=settle_failed parent=%s", job_id, parent_id)
        return
    if outcome:
        log.info("job=%s event=parent_settled parent=%s outcome=%s", job_id, parent_id, outcome)


def _monotonic_at(when: datetime | None) -> float | None:
    """The time.monotonic() reading at wall-clock time `when` (None stays None)."""
    if when is None:
        return None
    return time.monotonic() + (when - utcnow()).total_seconds()


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is an infrastructure hiccup worth a retry, never a user's mistake."""
    if isinstance(exc, TransientError | RedisConnectionError | RedisTimeoutError):
        return True
    if isinstance(exc, KombuOperationalError | OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _run(ctx: RunContext, kind: str, spec: object, send: Sender) -> None:
    job_id, attempt = ctx.job_id, ctx.attempt
    try:
        result = RUNNERS[kind](spec, ctx)
    except JobCancelled as exc:
        _cancel(ctx, exc)
    except (AwaitingShards, ClaimLost) as exc:
        # Nothing to write: the job waits for its shards, or another attempt holds it.
        awaiting = isinstance(exc, AwaitingShards)
        event = "awaiting_shards" if awaiting else "claim_lost"
        level = logging.INFO if awaiting else logging.WARNING
        log.log(level, "job=%s attempt=%d event=%s", job_id, attempt, event)
    except JobPreempted as exc:
        reason = f"preempted by job {exc.waiting_job_id} (higher priority); resumes later"
        log.info("job=%s attempt=%d event=preempted for=%s", job_id, attempt, exc.waiting_job_id)
        _requeue(ctx, send, reason, delay_s=0.0, preempted=True)
    except WorkerShutdown:
        _requeue(ctx, send, "its worker shut down (SIGTERM)", delay_s=0.0, graceful=True)
    except (JobTimeout, SoftTimeLimitExceeded) as exc:
        # Celery's soft limit carries no message: it is always the general limit's.
        limit = ctx.runtime.settings.job_time_limit_s or 0.0
        _fail(
            ctx, "TimeLimitExceeded", str(exc if isinstance(exc, JobTimeout) else JobTimeout(limit))
        )
    except (JobFailure, NotFound) as exc:  # NotFound: the spec names a missing model, say
        _fail(ctx, "JobFailure", str(exc))
    except Exception as exc:
        if is_transient(exc):
            _retry_transient(ctx, send, exc)
        else:
            log.exception("job=%s attempt=%d event=crashed", job_id, attempt)
            _fail(ctx, type(exc).__name__, str(exc) or repr(exc))
    else:
        with ctx.transaction() as session:
            jobs.succeed(session, job_id, attempt, result)
        log.info("job=%s attempt=%d event=succeeded", job_id, attempt)


def _cancel(ctx: RunContext, exc: JobCancelled) -> None:
    """The runner stopped for a cancel request, or (DeadlinePassed) for the job's deadline."""
    with ctx.transaction() as session:
        if not isinstance(exc, DeadlinePassed):
            jobs.mark_cancelled(session, ctx.job_id, ctx.attempt)
        elif jobs.expire(session, ctx.job_id, ctx.attempt, exc.reason):
            jobs.log(session, ctx.job_id, f"cancelled: {exc.reason}", "warning")
    event = "deadline_passed" if isinstance(exc, DeadlinePassed) else "cancelled"
    log.info("job=%s attempt=%d event=%s", ctx.job_id, ctx.attempt, event)


def _retry_transient(ctx: RunContext, send: Sender, exc: Exception) -> None:
    """Re-queue with exponential back-off while attempts remain; then fail with the cause."""
    settings = ctx.runtime.settings
    what = f"{type(exc).__name__}: {exc}"[:500]
    try:
        with session_scope(ctx.runtime.sessions) as session:
            job = session.get(Job, ctx.job_id)
            charged = job.charged_attempts if job is not None else settings.max_attempts
    except Exception:
        # The database itself is down: the heartbeat stops too, and the reconciler
        # re-queues the job once it is back. Nothing is lost by giving up here.
        log.exception("job=%s attempt=%d event=retry_unrecorded", ctx.job_id, ctx.attempt)
        return
    if charged >= settings.max_attempts:
        _fail(ctx, type(exc).__name__, f"gave up after {charged} attempts: {what}")
        return
    delay = min(settings.retry_backoff_s * 2 ** max(charged - 1, 0), settings.retry_backoff_max_s)
    log.warning("job=%s attempt=%d event=transient_error %s", ctx.job_id, ctx.attempt, what)
    _requeue(
        ctx,
        send,
        f"transient error, retrying in {delay:g} s: {what}",
        delay_s=delay,
        oom=isinstance(exc, RetryableOOM),
    )


def _requeue(
    ctx: RunContext,
    send: Sender,
    reason: str,
    *,
    delay_s: float,
    graceful: bool = False,
    oom: bool = False,
    preempted: bool = False,
) -> None:
    """Put the attempt back in the queue and send its message; if sending fails the job
    stays queued in the database and the reconciler sends it."""
    try:
        with ctx.transaction() as session:
            if not jobs.requeue(
                session,
                ctx.job_id,
                ctx.attempt,
                reason,
                graceful=graceful,
                oom=oom,
                preempted=preempted,
            ):
                return
            jobs.log(session, ctx.job_id, f"re-queued: {reason}", "warning")
            job = session.get(Job, ctx.job_id)
            assert job is not None
            if not submission.commit_and_send(session, send, job, delay_s=delay_s):
                return
    except Exception:
        log.exception("job=%s attempt=%d event=requeue_incomplete", ctx.job_id, ctx.attempt)
        return
    log.info("job=%s attempt=%d event=requeued reason=%s", ctx.job_id, ctx.attempt, reason)


def _fail(ctx: RunContext, error_type: str, message: str) -> None:
    with ctx.transaction() as session:
        jobs.fail(session, ctx.job_id, ctx.attempt, error_type, message)
        jobs.log(session, ctx.job_id, f"failed: {message}", "error")
    log.info("job=%s attempt=%d event=failed error=%s", ctx.job_id, ctx.attempt, error_type)


@contextmanager
def _heartbeats(runtime: Runtime, job_id: str, attempt: int) -> Iterator[None]:
    """Beat in a thread while the runner works, so a long step never looks like a crash."""
    stop = threading.Event()
    interval = runtime.settings.heartbeat_timeout_s / 4

    def beat() -> None:
        while not stop.wait(interval):
            try:
                with session_scope(runtime.sessions) as session:
                    if not jobs.heartbeat(session, job_id, attempt):
                        return
            except Exception:
                log.exception("job=%s attempt=%d event=heartbeat_failed", job_id, attempt)

    thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
