"""Where a queued job stands: its position on its queue and an estimated start.

The position counts the queued jobs that a worker of the job's queue takes first: those of
higher priority, then those submitted earlier (the broker's order). The estimate spreads
the work ahead over the workers serving the queue:

    start ≈ now + (Σ jobs ahead * median duration of their kind
                   + Σ running jobs' time left) / workers

A running job's time left is what its own progress says once it reports some (its pace so
far: a long training job is not taken for its kind's typical short one), and otherwise
what its kind's median leaves after the time it has run.

Durations are the newest SAMPLE successful attempts of each kind on the same queue
(finished_at - started_at); workers are the job slots of the live workers serving the
queue, from their presence records (the caller's `slots`), or where Redis cannot tell,
those running a job of the queue now or that finished one in the last WORKERS_SEEN. With
no live worker serving the queue, or no duration recorded for the queue at all, the start
is unknown (None); a kind without its own uses the median of the queue's other kinds.

Cost: one grouped COUNT over the queued jobs, one read of the running ones, and one
LIMIT-ed read per kind (at most the number of kinds, KINDS) on the index
(queue, kind, state, finished_at): bounded whatever the size of the jobs table.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from db.base import utcnow
from db.models import Job
from kiln.specs import KINDS
from kiln.states import JobState

SAMPLE = 50
WORKERS_SEEN = timedelta(hours=1)
#: The progress from which a running job's own pace tells its time left.
PACE_FROM = 0.01


@dataclass(frozen=True)
class QueueEstimate:
    #: 1 when the job is next on its queue.
    position: int
    #: When it should start; None when no duration is recorded for its queue.
    estimated_start_at: datetime | None


def estimate(
    session: Session,
    job: Job,
    slots: Callable[[str], int | None] | None = None,
    now: datetime | None = None,
) -> QueueEstimate | None:
    """Where `job` stands on its queue; None unless it is queued. `slots(queue)`: the job
    slots of the live workers serving a queue, None when they cannot be read."""
    if job.state != JobState.QUEUED:
        return None
    live = slots(job.queue) if slots is not None else None
    now = now or utcnow()
    ahead = _ahead_by_kind(session, job)
    running = session.execute(
        select(Job.kind, Job.started_at, Job.worker, Job.progress).where(
            Job.state == JobState.RUNNING, Job.queue == job.queue
        )
    ).all()
    kinds = set(ahead) | {kind for kind, _, _, _ in running}
    durations, workers = _history(session, job.queue, kinds, now)
    workers |= {worker for _, _, worker, _ in running if worker}
    position = sum(ahead.values()) + 1
    if live == 0:
        return QueueEstimate(position, None)  # no live worker serves the queue
    if not kinds:
        return QueueEstimate(position, now)  # nothing ahead, nothing running: next up
    every = [d for found in durations.values() for d in found]
    if not every:
        return QueueEstimate(position, None)
    median = {kind: statistics.median(durations.get(kind) or every) for kind in kinds}
    work = sum(count * median[kind] for kind, count in ahead.items())
    for kind, began, _, progress in running:
        elapsed = (now - began).total_seconds() if began else 0.0
        if progress >= PACE_FROM and elapsed > 0:
            work += elapsed * (1 - progress) / progress
        else:
            work += max(median[kind] - elapsed, 0.0)
    serving = live or max(len(workers), 1)
    return QueueEstimate(position, now + timedelta(seconds=work / serving))


def _history(
    session: Session, queue: str, kinds: set[str], now: datetime
) -> tuple[dict[str, list[float]], set[str]]:
    """Recent durations of `kinds` on `queue` (and, when one of them has none, of the
    queue's other kinds, whose median it borrows), and the workers that finished them
    within WORKERS_SEEN."""
    durations: dict[str, list[float]] = {}
    workers: set[str] = set()

    def sample(kind: str) -> None:
        for started, finished, worker in _recent(session, queue, kind):
            durations.setdefault(kind, []).append((finished - started).total_seconds())
            if worker and now - finished <= WORKERS_SEEN:
                workers.add(worker)

    for kind in sorted(kinds):
        sample(kind)
    if not kinds <= set(durations):
        for kind in sorted(set(KINDS) - kinds):
            sample(kind)
    return durations, workers


def _ahead_by_kind(session: Session, job: Job) -> dict[str, int]:
    """Queued jobs of the same queue taken before `job`, counted by kind."""
    earlier = or_(
        Job.created_at < job.created_at,
        and_(Job.created_at == job.created_at, Job.id < job.id),
    )
    rows = session.execute(
        select(Job.kind, func.count())
        .where(
            Job.state == JobState.QUEUED,
            Job.queue == job.queue,
            Job.id != job.id,
            or_(Job.priority > job.priority, and_(Job.priority == job.priority, earlier)),
        )
        .group_by(Job.kind)
    ).all()
    return {kind: int(count) for kind, count in rows}


def _recent(session: Session, queue: str, kind: str) -> list[tuple[datetime, datetime, str]]:
    """(started_at, finished_at, worker) of the newest successful jobs of `kind` on `queue`."""
    rows = session.execute(
        select(Job.started_at, Job.finished_at, Job.worker)
        .where(
            Job.queue == queue,
            Job.kind == kind,
            Job.state == JobState.SUCCEEDED,
            Job.finished_at.is_not(None),
            Job.started_at.is_not(None),
        )
        .order_by(Job.finished_at.desc())
        .limit(SAMPLE)
    ).all()
    return [(start, end, worker or "") for start, end, worker in rows if start and end]
