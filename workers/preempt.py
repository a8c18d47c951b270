"""Preemptive priorities: which running bulk job makes way for a waiting one of higher
priority. The scheduler's loop runs sweep(); the database is the record.

choose() is the decision, a pure function of what waits and what runs; sweep() reads both,
applies each choice with a compare-and-set (db.preemption.ask_to_stop), and writes why
each other waiting job still waits. The victim learns it at its next progress report
(the UPDATE … RETURNING that reads cancel_requested also reads preempt_for), stops at
its next step as on SIGTERM (a train job checkpoints its step, a batch job has committed
its chunk), and goes back to the queue without spending an attempt (workers/execute.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db import preemption as rows
from db.base import utcnow
from db.engine import session_scope
from kiln import routing
from kiln.settings import Settings

log = logging.getLogger(__name__)


class WaitingJob(Protocol):
    id: str
    queue: str
    priority: int


class RunningJob(Protocol):
    id: str
    queue: str
    device: str | None
    priority: int
    preemptible: bool
    preemptions: int
    preempt_for: str | None
    cancel_requested: bool
    started_at: datetime | None


@dataclass(frozen=True)
class Preemption:
    victim_id: str
    waiting_id: str


def can_preempt(victim: RunningJob, waiting: WaitingJob, max_preemptions: int) -> bool:
    """Whether `victim` may be stopped for `waiting`: lower priority, not opted out, not
    preempted `max_preemptions` times already (no starvation), not already stopping, and
    run by a worker that also serves `waiting`'s queue."""
    return (
        victim.priority < waiting.priority
        and victim.preemptible
        and victim.preemptions < max_preemptions
        and victim.preempt_for is None
        and not victim.cancel_requested
        and routing.can_serve(victim.queue, victim.device, waiting.queue)
    )


def choose(
    waiting: Sequence[WaitingJob], running: Iterable[RunningJob], max_preemptions: int
) -> list[Preemption]:
    """For each waiting job, most urgent first, the lowest-priority fair victim (the most
    recently started among equals: it has the least to redo, were its checkpoint old); a
    waiting job a victim already makes way for gets no second one."""
    running = list(running)
    taken = {job.preempt_for for job in running if job.preempt_for is not None}
    decisions = []
    for job in sorted(waiting, key=lambda w: -w.priority):  # stable: oldest first in a band
        if job.id in taken:
            continue
        victims = [v for v in running if v.id not in taken and can_preempt(v, job, max_preemptions)]
        if not victims:
            continue
        victim = min(victims, key=lambda v: (v.priority, -_started(v)))
        taken |= {victim.id, job.id}
        decisions.append(Preemption(victim.id, job.id))
    return decisions


def why_waiting(job: WaitingJob, running: Iterable[RunningJob], max_preemptions: int) -> str:
    """The status line of a bulk job that waits with no victim to make way for it."""
    serving = [v for v in running if routing.can_serve(v.queue, v.device, job.queue)]
    if not serving:
        return f"queued: waiting for a worker serving the {job.queue} queue"
    for victim in serving:
        if victim.preempt_for == job.id:
            return f"queued: job {victim.id} is making way for this one (preempted)"
    if all(v.priority >= job.priority for v in serving):
        return "queued: every worker that can run it runs a job of equal or higher priority"
    return (
        "queued: the lower-priority jobs running may not be preempted "
        f"(preemptible: false, already preempted {max_preemptions} times, or stopping)"
    )


def sweep(
    sessions: sessionmaker[Session], settings: Settings, now: datetime | None = None
) -> list[Preemption]:
    """One round: release stale requests, preempt where a bulk job of higher priority has
    waited KILN_PREEMPT_AFTER_S with no free worker, and say why the others wait."""
    now = now or utcnow()
    with session_scope(sessions) as session:
        rows.release_stale(session)
        waiting = rows.waiting(session, now - timedelta(seconds=settings.preempt_after_s))
        running = rows.running(session) if waiting else []
        session.expunge_all()
    decisions = choose(waiting, running, settings.max_preemptions)
    made = [d for d in decisions if _apply(sessions, d, settings.max_preemptions)]
    chosen = {d.waiting_id for d in made}
    if any(job.id not in chosen for job in waiting):
        with session_scope(sessions) as session:
            running_now = rows.running(session)  # with this sweep's own requests
            for job in waiting:
                if job.id not in chosen:
                    why = why_waiting(job, running_now, settings.max_preemptions)
                    rows.explain_wait(session, job.id, why)
    return made


def _apply(sessions: sessionmaker[Session], decision: Preemption, max_preemptions: int) -> bool:
    with session_scope(sessions) as session:
        if not rows.ask_to_stop(session, decision.victim_id, decision.waiting_id, max_preemptions):
            log.info("job=%s event=preemption_lost for=%s", decision.victim_id, decision.waiting_id)
            return False
        jobs.log(
            session,
            decision.victim_id,
            f"preempting: asked to stop at its next step for job {decision.waiting_id} "
            "(higher priority); it goes back to the queue and resumes where it stopped",
            "warning",
        )
        rows.explain_wait(
            session,
            decision.waiting_id,
            f"queued: job {decision.victim_id} is making way for this one (preempted)",
        )
    log.info("job=%s event=preemption_asked for=%s", decision.victim_id, decision.waiting_id)
    return True


def _started(job: RunningJob) -> float:
    return job.started_at.timestamp() if job.started_at is not None else 0.0
