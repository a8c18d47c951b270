"""Job state transitions, each a compare-and-set UPDATE that wins or reports that it lost.

Every write a worker makes names the attempt it holds, so a worker that lost its claim
(its job was re-queued after a missed heartbeat, say) can never overwrite the new attempt.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Insert, and_, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.base import utcnow
from db.models import Job, JobEvent, Metric
from kiln.errors import IllegalTransition, NotFound
from kiln.states import JobState, sources_of


def create(
    session: Session,
    *,
    kind: str,
    owner: str,
    spec: dict[str, Any],
    queue: str,
    priority: int = 0,
    idempotency_key: str | None = None,
    idempotency_fingerprint: str | None = None,
    preemptible: bool = True,
) -> Job:
    """Insert a queued job; the caller commits, then sends its id to the broker."""
    job = Job(
        kind=kind,
        owner=owner,
        spec=spec,
        queue=queue,
        priority=priority,
        preemptible=preemptible,
        idempotency_key=idempotency_key,
        idempotency_fingerprint=idempotency_fingerprint,
        state=JobState.QUEUED,
        attempt=0,
        progress=0.0,
        message="queued",
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def _cas(session: Session, job_id: str, where: ColumnElement[bool], **values: Any) -> bool:
    """UPDATE the job only if `where` holds; True if this caller won. A write that moves the
    job to another state also requires a state the machine allows that move from
    (kiln.states.TRANSITIONS), so no caller can make an illegal move by a loose `where`."""
    if "state" in values:
        where = and_(where, Job.state.in_(sources_of(JobState(values["state"]))))
    result = session.execute(
        update(Job).where(Job.id == job_id, where).values(**values),
        execution_options={"synchronize_session": False},
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _holds(attempt: int) -> ColumnElement[bool]:
    return and_(Job.state == JobState.RUNNING, Job.attempt == attempt)


def claim(session: Session, job_id: str, attempt: int, worker: str, device: str) -> int | None:
    """Move a queued job to running; returns the new attempt number, or None if this
    message is stale (the job already ran, runs elsewhere, or was cancelled)."""
    now = utcnow()
    won = _cas(
        session,
        job_id,
        and_(
            Job.state == JobState.QUEUED,
            Job.attempt == attempt,
            Job.cancel_requested.is_(False),
        ),
        state=JobState.RUNNING,
        attempt=attempt + 1,
        worker=worker,
        device=device,
        started_at=now,
        heartbeat_at=now,
        message="running",
    )
    return attempt + 1 if won else None


def heartbeat(session: Session, job_id: str, attempt: int) -> bool:
    """Record that the attempt is alive; False means it no longer holds the job."""
    return _cas(session, job_id, _holds(attempt), heartbeat_at=utcnow())


class StopFlags(NamedTuple):
    """What a running attempt is asked to do at its next step."""

    #: The user asked to cancel.
    cancel: bool
    #: The scheduler asked it to make way for this waiting job (preemption), or None.
    preempt_for: str | None


def report(
    session: Session, job_id: str, attempt: int, progress: float, message: str
) -> StopFlags | None:
    """Store progress (clamped to 0..1) and the status line, doubling as a heartbeat, in one
    statement that also reads the stop flags; None if the attempt no longer holds the job."""
    clamped = min(max(progress, 0.0), 1.0)
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, _holds(attempt))
        .values(progress=clamped, message=message, heartbeat_at=utcnow())
        .returning(Job.cancel_requested, Job.preempt_for),
        execution_options={"synchronize_session": False},
    ).one_or_none()
    return StopFlags(bool(row[0]), row[1]) if row is not None else None


def report_progress(
    session: Session, job_id: str, attempt: int, progress: float, message: str
) -> bool | None:
    """report(), answering only whether the user asked to cancel (None: claim lost)."""
    flags = report(session, job_id, attempt, progress, message)
    return flags.cancel if flags is not None else None


def stop_flags(session: Session, job_id: str) -> StopFlags:
    row = session.execute(
        select(Job.cancel_requested, Job.preempt_for).where(Job.id == job_id)
    ).one_or_none()
    return StopFlags(bool(row[0]), row[1]) if row is not None else StopFlags(False, None)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return stop_flags(session, job_id).cancel


def succeed(session: Session, job_id: str, attempt: int, result: dict[str, Any]) -> bool:
    return _cas(
        session,
        job_id,
        _holds(attempt),
        state=JobState.SUCCEEDED,
        progress=1.0,
        message="succeeded",
        result=result,
        finished_at=utcnow(),
    )


def attach_result(session: Session, job_id: str, attempt: int, result: dict[str, Any]) -> bool:
    """Record a running attempt's partial result (the error file of a job about to fail)."""
    return _cas(session, job_id, _holds(attempt), result=result)


def fail(
    session: Session, job_id: str, attempt: int | None, error_type: str, error_message: str
) -> bool:
    """Fail a running attempt, or (attempt None) a job wherever it is not yet finished."""
    where = (
        _holds(attempt)
        if attempt is not None
        else Job.state.in_([JobState.QUEUED, JobState.RUNNING])
    )
    return _cas(
        session,
        job_id,
        where,
        state=JobState.FAILED,
        message=f"failed: {error_message}"[:1000],
        error_type=error_type,
        error_message=error_message,
        finished_at=utcnow(),
    )


def mark_cancelled(session: Session, job_id: str, attempt: int) -> bool:
    """A running attempt saw the cancel request and stopped."""
    return _cas(
        session,
        job_id,
        _holds(attempt),
        state=JobState.CANCELLED,
        message="cancelled while running",
        finished_at=utcnow(),
    )


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job at once, or ask a running one to stop at its next step."""
    if JobState(job.state).is_terminal:
        raise IllegalTransition(f"job {job.id} is already {job.state}; it cannot be cancelled")
    now = utcnow()
    if not _cas(
        session,
        job.id,
        Job.state == JobState.QUEUED,
        state=JobState.CANCELLED,
        cancel_requested=True,
        message="cancelled before it started",
        finished_at=now,
    ):
        _cas(
            session,
            job.id,
            Job.state == JobState.RUNNING,
            cancel_requested=True,
            message="cancel requested",
        )
    session.refresh(job)
    return job


def requeue(
    session: Session,
    job_id: str,
    attempt: int,
    reason: str,
    *,
    graceful: bool = False,
    oom: bool = False,
    preempted: bool = False,
) -> bool:
    """Put a running attempt back in the queue (its worker was lost or shut down, it was
    preempted, or it hit a transient error).

    `graceful` (a worker shutting down on SIGTERM) refunds the attempt: shutdown_attempts
    grows with it, so max_attempts never counts it. `oom` counts a RetryableOOM, so the next
    attempt's runner can shrink its batch. `preempted` (it stopped for a job of higher
    priority) is graceful too, counts in `preemptions` and clears `preempt_for`. A job
    whose cancellation was requested is never re-queued: no claim would take it, so it
    would wait forever; the caller cancels it.
    """
    values: dict[str, Any] = {}
    if graceful or preempted:
        values["shutdown_attempts"] = Job.shutdown_attempts + 1
    if preempted:
        values["preemptions"] = Job.preemptions + 1
        values["preempt_for"] = None
    if oom:
        values["oom_retries"] = Job.oom_retries + 1
    return _cas(
        session,
        job_id,
        and_(_holds(attempt), Job.cancel_requested.is_(False)),
        state=JobState.QUEUED,
        message=f"re-queued: {reason}",
        worker=None,
        device=None,
        sent_at=None,
        **values,
    )


def mark_sent(session: Session, job_id: str, attempt: int, at: datetime | None = None) -> bool:
    """Record that a message for this queued attempt was sent (to be delivered at `at`)."""
    return _cas(
        session,
        job_id,
        and_(Job.state == JobState.QUEUED, Job.attempt == attempt),
        sent_at=at or utcnow(),
    )


def stalled(session: Session, older_than: timedelta) -> list[Job]:
    """Running jobs whose heartbeat is older than `older_than`."""
    cutoff: datetime = utcnow() - older_than
    return list(
        session.scalars(select(Job).where(Job.state == JobState.RUNNING, Job.heartbeat_at < cutoff))
    )


def waiting(session: Session, older_than: timedelta) -> list[Job]:
    """Queued jobs whose latest message was sent more than `older_than` ago, or that were
    queued that long ago and never sent (the send after commit failed)."""
    cutoff: datetime = utcnow() - older_than
    return list(
        session.scalars(
            select(Job).where(
                Job.state == JobState.QUEUED,
                or_(
                    Job.sent_at < cutoff,
                    and_(Job.sent_at.is_(None), Job.created_at < cutoff),
                ),
            )
        )
    )


def count_queued(session: Session, owner: str) -> int:
    """How many of `owner`'s jobs wait in the queue (the per-owner quota counts these)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner == owner, Job.state == JobState.QUEUED)
        )
        or 0
    )


def find_idempotent(session: Session, owner: str, key: str) -> Job | None:
    """The job `owner` submitted earlier with this Idempotency-Key, if any."""
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def log(session: Session, job_id: str, message: str, level: str = "info") -> None:
    log_lines(session, job_id, [(message, level)])


def log_lines(session: Session, job_id: str, lines: list[tuple[str, str]]) -> None:
    """Append (message, level) lines to the job's log in one Core INSERT: through the ORM,
    SQLite would take one statement per line to hand back each row's id."""
    if lines:
        at = utcnow()
        rows = [{"job_id": job_id, "message": m, "level": lvl, "at": at} for m, lvl in lines]
        session.execute(insert(JobEvent.__table__), rows)


def record_metrics(session: Session, job_id: str, points: list[tuple[str, int, float]]) -> None:
    """Record many points in one INSERT .. ON CONFLICT (job, name, step) DO UPDATE: a step
    reported again (by a resumed attempt) keeps its latest value, and nothing is read
    first, so the cost does not grow with the series already stored."""
    if not points:
        return
    latest = {(name, step): value for name, step, value in points}
    now = utcnow()
    rows = [
        {"job_id": job_id, "name": name, "step": step, "value": value, "at": now}
        for (name, step), value in latest.items()
    ]
    session.execute(_metric_upsert(session.get_bind().dialect.name), rows)


@functools.cache
def _metric_upsert(dialect: str) -> Insert:
    """The statement record_metrics runs, built once per dialect (a running job issues it
    every few hundred ms). A Core insert: the ORM's bulk path would add per-row work."""
    insert_into = postgresql_insert if dialect == "postgresql" else sqlite_insert
    upsert = insert_into(Metric.__table__)
    return upsert.on_conflict_do_update(
        index_elements=["job_id", "name", "step"],
        set_={"value": upsert.excluded.value, "at": upsert.excluded.at},
    )


def get_owned(session: Session, job_id: str, owner: str | None) -> Job:
    """The job, if `owner` may see it (None: an admin sees all); otherwise NotFound."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise NotFound(f"no job {job_id}")
    return job
