"""Deleting and expiring finished jobs (docs/retention.md).

A job is deleted by its owner (DELETE /jobs/<id>) or expired by the sweeper
(workers/sweeper.py) once its `expires_at` passed. Both are for finished jobs only, and
both keep lineage: a model version a job registered stays (its `source_job_id` keeps naming
the job as a record, though the job may be gone), and a job that a queued or running job
resumes from (`resume_from`, which reads its checkpoint) is neither deleted nor expired.

The functions here change rows only and return the digests whose files nothing refers to
any more; the caller removes those files, and the job's own files (kiln.job_files), after
committing, so a failed commit never leaves a row naming a removed file.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db import references
from db.models import Job, JobEvent
from kiln.errors import IllegalTransition, InUse
from kiln.states import JobState

_TERMINAL = [state for state in JobState if state.is_terminal]
_LIVE = [JobState.QUEUED, JobState.RUNNING]


def delete_job(session: Session, job: Job) -> list[str]:
    """Delete a finished job with its log lines and metrics (they cascade), refused while it
    is queued or running (IllegalTransition: cancel it first) or while a live job resumes
    from it (InUse). Returns the digests of its output files that nothing else refers to."""
    if not JobState(job.state).is_terminal:
        raise IllegalTransition(
            f"job {job.id} is {job.state}; only a finished job can be deleted "
            "(cancel it, then delete it once it has stopped)"
        )
    resuming = resumed_from(session).get(job.id)
    if resuming:
        raise InUse(
            f"job {resuming} resumes from job {job.id}'s checkpoint; "
            "wait for it to finish or cancel it first"
        )
    digests = references.result_digests(job.result)
    session.delete(job)
    session.flush()
    return sorted(d for d in digests if not references.digest_in_use(session, d))


def resumed_from(session: Session) -> dict[str, str]:
    """Jobs a queued or running job resumes from (its spec's `resume_from`), each with the
    id of one such live job: their checkpoints must stay."""
    live = session.execute(select(Job.id, Job.spec).where(Job.state.in_(_LIVE)))
    return {
        spec["resume_from"]: job_id
        for job_id, spec in live
        if isinstance(spec.get("resume_from"), str)
    }


def stamp_expiry(session: Session, default_s: int, *, limit: int = 1000) -> int:
    """Give finished jobs without an `expires_at` one: finished_at + their expires_after_s,
    or `default_s` (KILN_RETENTION_DAYS) for a job that has none (made before retention
    existed, or by a path that set none). Returns how many this call stamped."""
    rows = session.execute(
        select(Job.id, Job.finished_at, Job.expires_after_s)
        .where(
            Job.state.in_(_TERMINAL),
            Job.expires_at.is_(None),
            Job.expired_at.is_(None),
            Job.finished_at.is_not(None),
        )
        .limit(limit)
    ).all()
    stamped = 0
    for job_id, finished_at, keep_s in rows:
        if finished_at is None:  # excluded by the query; this narrows the type
            continue
        expires_at = finished_at + timedelta(seconds=keep_s if keep_s is not None else default_s)
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.expires_at.is_(None))
            .values(expires_at=expires_at),
            execution_options={"synchronize_session": False},
        )
        # Session.execute is typed as returning a Result; an UPDATE's is a CursorResult.
        stamped += result.rowcount  # type: ignore[attr-defined]
    return stamped


def due(
    session: Session, now: datetime, *, limit: int = 500, keep: Iterable[str] = ()
) -> list[Job]:
    """Finished jobs past their `expires_at` and not expired yet, oldest expiry first,
    leaving out the ids in `keep`."""
    query = (
        select(Job)
        .where(Job.expired_at.is_(None), Job.expires_at <= now, Job.state.in_(_TERMINAL))
        .order_by(Job.expires_at, Job.id)
        .limit(limit)
    )
    if kept := list(keep):
        query = query.where(Job.id.not_in(kept))
    return list(session.scalars(query))


def expire(session: Session, job: Job, now: datetime) -> list[str]:
    """Mark the job expired and delete its log lines; its row, result and metrics stay as
    the record of what ran. Returns the digests of its output files that nothing else refers
    to (an expired job's result no longer holds them)."""
    session.execute(
        update(Job).where(Job.id == job.id).values(expired_at=now),
        execution_options={"synchronize_session": False},
    )
    session.execute(delete(JobEvent).where(JobEvent.job_id == job.id))
    session.flush()
    digests = references.result_digests(job.result)
    return sorted(d for d in digests if not references.digest_in_use(session, d))


def expired_or_missing(session: Session, job_ids: list[str]) -> set[str]:
    """Those of `job_ids` that name no job, or an expired one: their scratch is an orphan."""
    if not job_ids:
        return set()
    rows = session.execute(select(Job.id, Job.expired_at).where(Job.id.in_(job_ids)))
    expired_at: dict[str, datetime | None] = {job_id: at for job_id, at in rows}
    return {
        job_id for job_id in job_ids if job_id not in expired_at or expired_at[job_id] is not None
    }
