"""Make the database and the broker agree: the database is the record, the broker a hint.

- A running job whose heartbeat stopped lost its worker: it goes back to the queue while
  attempts remain, and fails with the reason once they are spent. A job past its time
  limit (Celery's hard limit killed its pool process) fails with that reason instead. If
  its user had asked to cancel it, it is cancelled (a re-queued job would never be claimed).
  A one-job worker whose pool process starts again does the same at once for what it
  was running (`recover_lost_process`), without waiting for the heartbeat to go stale.
- A queued job whose message is gone is sent again. "Gone" is decided per job, not per
  queue: Redis here keeps nothing on disk, and a restart from a stale snapshot brings back
  some old messages while losing newer ones, so an empty-queue test would strand the jobs
  behind a resurrected message. Each job row records when its latest message was sent
  (`sent_at`); a queued job whose message is older than `resend_after_s` and whose
  (id, attempt) is not in the broker's list is resent. A scheduler that has just started
  gives no such grace to messages sent before it started (`started_at`): after a restart
  of the whole stack those are the ones Redis may have lost, so its first sweep, at once,
  resends them within seconds. Old messages that come back are
  harmless: the claim (state and attempt compare-and-set) drops every message but one.
  A Redis set of "ids with live messages" was the alternative; it would itself be lost or
  rolled back with the same restart, so reading the lists is the one source that cannot
  disagree with what workers will actually receive.
- A sharded job awaiting its shards is settled (db.shards.settle): the worker that ended
  its last shard does that, but may have died first, so each sweep looks at every
  waiting one (assemble when all succeeded, fail or cancel when one failed or was).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import jobs, shards, submission
from db.base import utcnow
from db.engine import session_scope
from db.models import Job
from kiln.broker import Sender
from kiln.settings import Settings

log = logging.getLogger(__name__)

#: (job id, attempt) of every message waiting in a queue.
WaitingMessages = Callable[[str], set[tuple[str, int]]]


@dataclass(frozen=True)
class Report:
    requeued: int = 0
    failed: int = 0
    resent: int = 0
    cancelled: int = 0
    timed_out: int = 0
    #: Jobs cancelled because their own deadline (deadline_s) passed.
    expired: int = 0
    #: Sharded jobs moved on (assembling, failed or cancelled) by this sweep.
    settled: int = 0


def reconcile(
    sessions: sessionmaker[Session],
    settings: Settings,
    send: Sender,
    waiting: WaitingMessages,
    started_at: datetime | None = None,
) -> Report:
    """One sweep: recover stalled running jobs, then resend queued jobs with no message.

    `started_at`, when the caller (the scheduler) started: a queued job whose message was
    sent before then and is not in the broker is resent without waiting `resend_after_s`.
    """
    stalled = _recover_stalled(sessions, settings, send)
    stalled["expired"] += _expire_queued(sessions)
    resent = _resend_orphans(sessions, settings, send, waiting, started_at)
    settled = _settle_sharded(sessions, send)
    return Report(resent=resent, settled=settled, **stalled)


def _settle_sharded(sessions: sessionmaker[Session], send: Sender) -> int:
    """Settle every sharded job awaiting its shards; how many moved on."""
    with session_scope(sessions) as session:
        parents = shards.awaiting(session)
    settled = 0
    for parent_id in parents:
        with session_scope(sessions) as session:
            outcome = shards.settle(session, send, parent_id)
        if outcome:
            log.info("job=%s event=settled outcome=%s by=reconciler", parent_id, outcome)
            settled += 1
    return settled


def resend_grace(settings: Settings, started_at: datetime | None, now: datetime) -> timedelta:
    """How old a queued job's message must be before a missing one counts as lost: the
    configured grace, but never past the caller's start (messages sent before it get none)."""
    grace = timedelta(seconds=settings.resend_after_s)
    if started_at is None:
        return grace
    return max(timedelta(0), min(grace, now - started_at))


def time_limit_reason(limit_s: float) -> str:
    """The one wording of a time-limit failure (soft limit in the runner, hard here)."""
    return f"exceeded its time limit of {limit_s:g} s"


def deadline_reason(deadline_s: float) -> str:
    """The one wording of a job cancelled by its own deadline (worker and scheduler)."""
    return f"deadline of {deadline_s:g} s passed"


def recover_lost_process(
    sessions: sessionmaker[Session], settings: Settings, send: Sender, worker: str
) -> dict[str, int]:
    """Recover, at once, what the database records as running on `worker`, a one-job
    worker whose pool process has just started: whatever it ran is running no more. Its
    pool process died (killed, crashed, past the hard time limit), or the whole worker did
    and was restarted under its name; a pool process dies with its worker (Celery sets
    SIGKILL on parent death), so none goes on running it. Without this, such a job would
    wait KILN_HEARTBEAT_TIMEOUT_S for the scheduler. Worker names are unique in a
    deployment (device@host, as Celery requires)."""
    with session_scope(sessions) as session:
        lost = jobs.running_attempts_on(session, worker)
    return _recover(sessions, settings, send, lost, "lost the process running it")


def _recover_stalled(
    sessions: sessionmaker[Session], settings: Settings, send: Sender
) -> dict[str, int]:
    timeout = timedelta(seconds=settings.heartbeat_timeout_s)
    with session_scope(sessions) as session:
        stalled = jobs.stalled(session, timeout)
    return _recover(sessions, settings, send, stalled, "stopped heartbeating")


def _recover(
    sessions: sessionmaker[Session], settings: Settings, send: Sender, lost: list[Job], how: str
) -> dict[str, int]:
    """Re-queue, fail or cancel each job of `lost`, whose worker `how` (a reason's words)."""
    counts = {"requeued": 0, "failed": 0, "cancelled": 0, "timed_out": 0, "expired": 0}
    for job in lost:
        with session_scope(sessions) as session:
            outcome = _recover_one(session, settings, job, how)
            if outcome == "requeued":
                submission.commit_and_send(session, send, job)
        if outcome:
            counts[outcome] += 1
    return counts


def _recover_one(session: Session, settings: Settings, job: Job, how: str) -> str | None:
    """Decide one lost job's fate; returns what happened, or None if it lost the race."""
    limit = settings.job_time_limit_s
    if limit and job.started_at and utcnow() - job.started_at >= timedelta(seconds=limit):
        if jobs.fail(session, job.id, job.attempt, "TimeLimitExceeded", time_limit_reason(limit)):
            return "timed_out"
        return None
    if job.deadline_s is not None and job.deadline_at and utcnow() >= job.deadline_at:
        reason = deadline_reason(job.deadline_s)
        if jobs.expire(session, job.id, job.attempt, reason):
            jobs.log(session, job.id, f"cancelled: {reason} (its worker was lost)", "warning")
            return "expired"
        return None
    if job.cancel_requested:
        if jobs.mark_cancelled(session, job.id, job.attempt):
            reason = f"worker {job.worker} was lost after the cancel request"
            jobs.log(session, job.id, f"cancelled: {reason}", "warning")
            return "cancelled"
        return None
    if job.charged_attempts < settings.max_attempts:
        reason = f"worker {job.worker} {how} (attempt {job.attempt})"
        if jobs.requeue(session, job.id, job.attempt, reason):
            jobs.log(session, job.id, reason, "warning")
            return "requeued"
        return None
    reason = (
        f"the worker running this job was lost {job.charged_attempts} times "
        f"(last: {job.worker}); it may be crashing its worker (out of memory?)"
    )
    if jobs.fail(session, job.id, job.attempt, "WorkerLost", reason):
        jobs.log(session, job.id, f"failed: {reason}", "error")
        return "failed"
    return None


def _expire_queued(sessions: sessionmaker[Session]) -> int:
    """Cancel queued jobs whose deadline passed before any worker took them: they would
    only run to be stopped. (A message still in the broker is dropped by the claim.)"""
    expired = 0
    with session_scope(sessions) as session:
        for job in jobs.past_deadline(session):
            reason = deadline_reason(job.deadline_s or 0.0)
            if jobs.expire(session, job.id, None, reason):
                jobs.log(session, job.id, f"cancelled: {reason} before it started", "warning")
                expired += 1
    return expired


def _resend_orphans(
    sessions: sessionmaker[Session],
    settings: Settings,
    send: Sender,
    waiting: WaitingMessages,
    started_at: datetime | None,
) -> int:
    # The database is read before the broker: a message sent in between is then seen as
    # present or is younger than the grace period, so a live job is never counted as lost.
    # (With no grace, just after a start, one sent in between may be sent twice: the claim
    # drops the duplicate.)
    with session_scope(sessions) as session:
        candidates = jobs.waiting(session, resend_grace(settings, started_at, utcnow()))
    present: set[tuple[str, int]] = set()
    for queue in {job.queue for job in candidates}:
        present |= waiting(queue)
    orphans = [job for job in candidates if (job.id, job.attempt) not in present]
    resent = 0
    for job in orphans:
        log.warning("job=%s attempt=%d event=resent reason=no_live_message", job.id, job.attempt)
        with session_scope(sessions) as session:
            resent += submission.commit_and_send(session, send, job)
    return resent
