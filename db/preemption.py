"""Preemption's rows: what waits, what runs, and the compare-and-set that asks a running
job to make way for a waiting one (workers/preempt.py decides which).

The record is `jobs.preempt_for` on the victim, naming the waiting job; a unique
constraint on it means one waiting job is ever named by one victim, so two deciders
racing for it cannot both preempt.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from db.models import Job
from kiln.states import JobState

#: Queues of the interactive lane start so (kiln.routing); preemption is for bulk work.
_INTERACTIVE = "interactive.%"


def waiting(session: Session, sent_before: datetime, limit: int = 100) -> list[Job]:
    """Bulk jobs queued whose message went out before `sent_before` and that no worker has
    taken since: with prefetch 1, a free worker of their queue would have."""
    return list(
        session.scalars(
            select(Job)
            .where(
                Job.state == JobState.QUEUED,
                Job.queue.not_like(_INTERACTIVE),
                Job.cancel_requested.is_(False),
                Job.sent_at.is_not(None),
                Job.sent_at <= sent_before,
            )
            .order_by(Job.priority.desc(), Job.created_at)
            .limit(limit)
        )
    )


def running(session: Session) -> list[Job]:
    """Running bulk jobs: every possible victim, and the record of pending preemptions. A
    sharded job waiting for its shards holds no worker: its shards are the victims."""
    return list(
        session.scalars(
            select(Job).where(
                Job.state == JobState.RUNNING,
                Job.queue.not_like(_INTERACTIVE),
                Job.awaiting_shards.is_(False),
            )
        )
    )


def ask_to_stop(session: Session, victim_id: str, waiting_id: str, max_preemptions: int) -> bool:
    """Name `waiting_id` on the running victim, if it is still a fair victim and the
    waiting job still waits; False if another decider got there first (the same victim,
    or another victim already named for this waiting job: the unique constraint). Run it
    in a transaction of its own: a lost race rolls the session back."""
    target = aliased(Job)
    still_waits = exists().where(target.id == waiting_id, target.state == JobState.QUEUED)
    try:
        result = session.execute(
            update(Job)
            .where(
                Job.id == victim_id,
                Job.state == JobState.RUNNING,
                Job.preempt_for.is_(None),
                Job.awaiting_shards.is_(False),
                Job.preemptible.is_(True),
                Job.preemptions < max_preemptions,
                Job.cancel_requested.is_(False),
                still_waits,
            )
            .values(preempt_for=waiting_id),
            execution_options={"synchronize_session": False},
        )
        session.flush()
    except IntegrityError:
        session.rollback()
        return False
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def release_stale(session: Session) -> int:
    """Clear requests that no longer stand: the victim is no longer running (it finished
    before its next step), or the job it makes way for no longer waits (another worker
    freed up): the victim then carries on, and the waiting job's name is free again."""
    if session.scalar(select(Job.id).where(Job.preempt_for.is_not(None)).limit(1)) is None:
        return 0  # the common case, read only: no write lock taken every tick (SQLite)
    target = aliased(Job)
    still_waits = exists().where(target.id == Job.preempt_for, target.state == JobState.QUEUED)
    result = session.execute(
        update(Job)
        .where(
            Job.preempt_for.is_not(None),
            or_(Job.state != JobState.RUNNING, and_(~still_waits)),
        )
        .values(preempt_for=None),
        execution_options={"synchronize_session": False},
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def explain_wait(session: Session, job_id: str, message: str) -> bool:
    """Set a queued job's status line to why it waits (only if it changed, so a sweep
    writes nothing while nothing changes)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED, Job.message != message)
        .values(message=message),
        execution_options={"synchronize_session": False},
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
