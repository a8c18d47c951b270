"""Job state transitions, each a compare-and-set UPDATE that wins or reports that it lost.

Every write a worker makes names the attempt it holds, so a worker that lost its claim
(its job was re-queued after a missed heartbeat, say) can never overwrite the new attempt.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import ColumnElement, Insert, Table, and_, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, selectinload

from db import owned, webhooks
from db import tags as job_tags
from db.base import utcnow
from db.models import Job, JobEvent, Metric
from kiln.errors import IllegalTransition, InvalidRequest
from kiln.states import JobState, sources_of
from kiln.webhooks import Webhook

T = TypeVar("T")


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
    expires_after_s: int | None = None,
    webhook: Webhook | None = None,
    tags: dict[str, str] | None = None,
    deadline_s: float | None = None,
) -> Job:
    """Insert a queued job; the caller commits, then sends its id to the broker.
    `expires_after_s`: how long its outputs and log lines outlive it (see Job)."""
    now = utcnow()
    job = Job(
        kind=kind,
        owner=owner,
        spec=spec,
        queue=queue,
        priority=priority,
        preemptible=preemptible,
        idempotency_key=idempotency_key,
        idempotency_fingerprint=idempotency_fingerprint,
        expires_after_s=expires_after_s,
        webhook_url=webhook.url if webhook else None,
        webhook_events=list(webhook.events) if webhook else None,
        state=JobState.QUEUED,
        attempt=0,
        progress=0.0,
        message="queued",
        created_at=now,
        deadline_s=deadline_s,
        deadline_at=now + timedelta(seconds=deadline_s) if deadline_s is not None else None,
        tag_rows=job_tags.rows(tags or {}),
    )
    session.add(job)
    session.flush()
    return job


def _cas(session: Session, job_id: str, where: ColumnElement[bool], **values: Any) -> bool:
    """UPDATE the job only if `where` holds; True if this caller won. A write that moves the
    job to another state also requires a state the machine allows that move from
    (kiln.states.TRANSITIONS), so no caller can make an illegal move by a loose `where`,
    and queues the move's webhook event in the same transaction (db.webhooks)."""
    if "state" in values:
        where = and_(where, Job.state.in_(sources_of(JobState(values["state"]))))
        if "finished_at" in values:
            values["expires_at"] = _expiry(session, job_id, values["finished_at"])
        moved = session.execute(
            update(Job)
            .where(Job.id == job_id, where)
            .values(**values)
            .returning(*webhooks.RETURNED),
            execution_options={"synchronize_session": False},
        ).one_or_none()
        if moved is not None:
            webhooks.on_transition(session, moved)
        return moved is not None
    result = session.execute(
        update(Job).where(Job.id == job_id, where).values(**values),
        execution_options={"synchronize_session": False},
    )
    # Session.execute is typed as returning a Result; an UPDATE's is a CursorResult.
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _expiry(session: Session, job_id: str, finished_at: datetime) -> datetime | None:
    """When a job finishing at `finished_at` expires: its expires_after_s later (fixed at
    submit, so reading it before the compare-and-set is safe). None for a job without one:
    the sweeper stamps those with the retention in force (db.retention.stamp_expiry)."""
    keep_s = session.scalar(select(Job.expires_after_s).where(Job.id == job_id))
    return finished_at + timedelta(seconds=keep_s) if keep_s is not None else None


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


def claim_followers(
    session: Session,
    leader_id: str,
    default_device: str,
    take: Callable[[Job], T | None],
    size: Callable[[T], int],
    *,
    budget: int,
    limit: int,
) -> list[tuple[str, int, T]]:
    """Claim queued jobs to run alongside the leader (dynamic batching): of its owner and
    kind, not cancelled, highest priority first, at most `limit` looked at; each one `take`
    accepts and whose `size` fits what is left of `budget` is claimed with the ordinary
    compare-and-set, on the leader's worker and device. Returns (job id, the attempt
    claimed, what `take` returned) for each one won."""
    leader = session.get_one(Job, leader_id)
    worker, device = leader.worker or "unknown", leader.device or default_device
    candidates = session.scalars(
        select(Job)
        .where(
            Job.state == JobState.QUEUED,
            Job.kind == leader.kind,
            Job.owner == leader.owner,
            Job.cancel_requested.is_(False),
        )
        .order_by(Job.priority.desc(), Job.created_at)
        .limit(limit)
    ).all()
    claimed = []
    for job in candidates:
        taken = take(job)
        if taken is None or size(taken) > budget:
            continue
        attempt = claim(session, job.id, job.attempt, worker, device)
        if attempt is not None:
            claimed.append((job.id, attempt, taken))
            budget -= size(taken)
    return claimed


def finish_followers(
    session: Session, leader_id: str, endings: list[tuple[str, int, dict[str, Any] | str]]
) -> None:
    """End jobs a leader claimed and ran: each succeeds with its result (marked
    `batched_with` the leader) or fails with its reason (a str); a cancel request that came
    in while they ran is honoured instead."""
    ids = [job_id for job_id, _, _ in endings]
    cancelled = set(
        session.scalars(select(Job.id).where(Job.id.in_(ids), Job.cancel_requested.is_(True)))
    )
    for job_id, attempt, ending in endings:
        if job_id in cancelled:
            mark_cancelled(session, job_id, attempt)
        elif isinstance(ending, str):
            fail(session, job_id, attempt, "JobFailure", ending)
        else:
            succeed(session, job_id, attempt, ending | {"batched_with": leader_id})


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
        .returning(Job.cancel_requested, Job.preempt_for, *webhooks.RETURNED),
        execution_options={"synchronize_session": False},
    ).one_or_none()
    if row is None:
        return None
    if row.webhook_url is not None:
        webhooks.on_progress(session, row)
    return StopFlags(bool(row.cancel_requested), row.preempt_for)


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


def expire(session: Session, job_id: str, attempt: int | None, reason: str) -> bool:
    """Cancel a job whose deadline passed: a running attempt that saw it (attempt given), or
    (attempt None) a job still queued. Its error says why, so a client can tell it from a
    cancel the user asked for."""
    where = _holds(attempt) if attempt is not None else Job.state == JobState.QUEUED
    return _cas(
        session,
        job_id,
        where,
        state=JobState.CANCELLED,
        cancel_requested=True,
        message=f"cancelled: {reason}"[:1000],
        error_type="DeadlineExceeded",
        error_message=reason,
        finished_at=utcnow(),
    )


def past_deadline(session: Session, limit: int = 1000) -> list[Job]:
    """Queued jobs whose deadline has passed, oldest deadline first, `limit` at most."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.state == JobState.QUEUED, Job.deadline_at <= utcnow())
            .order_by(Job.deadline_at)
            .limit(limit)
        )
    )


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job at once, or ask a running one to stop at its next step. A
    sharded job waiting for its shards is cancelled at once; its unfinished shards are
    cancelled with it (each as above). A queued shard cancelled on its own cancels its
    sharded job (a running one does when it stops: db.shards.settle)."""
    if JobState(job.state).is_terminal:
        raise IllegalTransition(f"job {job.id} is already {job.state}; it cannot be cancelled")
    _cancel_one(session, job.id)
    cancel_shards(session, job.id)
    session.refresh(job)
    if job.parent_id is not None and job.state == JobState.CANCELLED:
        reason = f"cancelled: shard {job.shard_index} (job {job.id}) was cancelled"
        if end_awaiting(session, job.parent_id, JobState.CANCELLED, reason):
            log(session, job.parent_id, reason, "warning")
            cancel_shards(session, job.parent_id)
    return job


def _cancel_one(session: Session, job_id: str, reason: str = "") -> None:
    now = utcnow()
    if _cas(
        session,
        job_id,
        Job.state == JobState.QUEUED,
        state=JobState.CANCELLED,
        cancel_requested=True,
        message=f"cancelled before it started{reason}",
        finished_at=now,
    ):
        return
    if _cas(
        session,
        job_id,
        _awaiting_shards(),
        state=JobState.CANCELLED,
        cancel_requested=True,
        awaiting_shards=False,
        message=f"cancelled while its shards ran{reason}",
        finished_at=now,
    ):
        return
    _cas(
        session,
        job_id,
        Job.state == JobState.RUNNING,
        cancel_requested=True,
        message=f"cancel requested{reason}",
    )


def cancel_shards(session: Session, parent_id: str) -> int:
    """Cancel (or ask to stop) every unfinished shard of `parent_id`; how many."""
    active = list(
        session.scalars(
            select(Job.id).where(
                Job.parent_id == parent_id,
                Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
                Job.cancel_requested.is_(False),
            )
        )
    )
    for child_id in active:
        _cancel_one(session, child_id, " (its sharded job ended)")
    return len(active)


# A sharded job's own moves (db.shards orchestrates them). While its shards run the job is
# `running` with `awaiting_shards` set and no attempt alive: no worker, no heartbeat.


def _awaiting_shards() -> ColumnElement[bool]:
    return and_(Job.state == JobState.RUNNING, Job.awaiting_shards.is_(True))


def await_shards(session: Session, job_id: str, attempt: int, shards: int, message: str) -> bool:
    """The running attempt handed its rows to `shards` child jobs and ends: the job waits
    for them without holding a worker. False if the attempt lost the job or a cancel was
    requested meanwhile."""
    return _cas(
        session,
        job_id,
        and_(_holds(attempt), Job.cancel_requested.is_(False), Job.preempt_for.is_(None)),
        awaiting_shards=True,
        shard_count=shards,
        worker=None,
        heartbeat_at=None,
        progress=0.0,
        message=message,
    )


def report_shards(session: Session, job_id: str, progress: float, message: str) -> bool:
    """Record a waiting sharded job's combined progress (only if its line changed)."""
    return _cas(
        session,
        job_id,
        and_(_awaiting_shards(), Job.message != message),
        progress=min(max(progress, 0.0), 1.0),
        message=message,
    )


def wake_to_assemble(session: Session, job_id: str, message: str) -> bool:
    """Every shard succeeded: queue the job again, for an attempt that assembles their
    outputs. The attempt that split it is refunded (it ended as planned)."""
    return _cas(
        session,
        job_id,
        and_(_awaiting_shards(), Job.cancel_requested.is_(False)),
        state=JobState.QUEUED,
        awaiting_shards=False,
        shutdown_attempts=Job.shutdown_attempts + 1,
        sent_at=None,
        message=message,
    )


def end_awaiting(
    session: Session,
    job_id: str,
    state: JobState,
    message: str,
    error_type: str | None = None,
) -> bool:
    """A shard failed or was cancelled: the waiting job ends `state` (failed or cancelled)."""
    values: dict[str, Any] = {"message": message}
    if state == JobState.FAILED:
        values |= {"error_type": error_type or "ShardFailed", "error_message": message}
        values["message"] = f"failed: {message}"[:1000]
    return _cas(
        session,
        job_id,
        _awaiting_shards(),
        state=state,
        awaiting_shards=False,
        finished_at=utcnow(),
        **values,
    )


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
    # A sharded job waiting for its shards has no attempt (and no heartbeat) to go stale.
    return list(
        session.scalars(
            select(Job).where(
                Job.state == JobState.RUNNING,
                Job.heartbeat_at < cutoff,
                Job.awaiting_shards.is_(False),
            )
        )
    )


def running_attempts_on(session: Session, worker: str) -> list[Job]:
    """The jobs the database records as running an attempt on `worker` (a Celery name);
    a sharded job awaiting its shards runs none."""
    return list(
        session.scalars(
            select(Job).where(
                Job.state == JobState.RUNNING,
                Job.worker == worker,
                Job.awaiting_shards.is_(False),
            )
        )
    )


def running_on(session: Session, workers: list[str]) -> dict[str, Job]:
    """The running job of each of `workers` (Celery names, as claims record them) that
    runs one; a worker runs one job at a time (concurrency 1)."""
    if not workers:
        return {}
    found = session.scalars(
        select(Job).where(Job.state == JobState.RUNNING, Job.worker.in_(workers))
    )
    return {job.worker: job for job in found if job.worker is not None}


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
    """How many of `owner`'s jobs wait in the queue (the per-owner quota counts these);
    the shards of a sharded job are not counted: the job itself was admitted."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner == owner, Job.state == JobState.QUEUED, Job.parent_id.is_(None))
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
        # Lines are read in id order (a stream's cursor, `/events?after=`), but PostgreSQL
        # takes an id at insert and shows it at commit: holding the job's row until this
        # transaction ends makes another process's lines for this job wait, so they take
        # their ids after these and commit after them. (SQLite serialises all writers.)
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update(key_share=True))
        at = utcnow()
        rows = [{"job_id": job_id, "message": m, "level": lvl, "at": at} for m, lvl in lines]
        # The table, not the entity: a Core insert, not the ORM's bulk path (see above).
        session.execute(insert(cast(Table, JobEvent.__table__)), rows)


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
    upsert = insert_into(cast(Table, Metric.__table__))
    return upsert.on_conflict_do_update(
        index_elements=["job_id", "name", "step"],
        set_={"value": upsert.excluded.value, "at": upsert.excluded.at},
    )


def get_owned(session: Session, job_id: str, owner: str | None) -> Job:
    """The job, if `owner` may see it (None: an admin sees all); otherwise NotFound."""
    return owned.get_owned(session, Job, job_id, owner)


class Page(NamedTuple):
    """One page of a listing, and the cursor of the next (None on the last page)."""

    jobs: list[Job]
    next_cursor: str | None


def listed(
    session: Session,
    owner: str | None,
    *,
    state: JobState | None = None,
    kind: str | None = None,
    tags: list[tuple[str, str | None]] | None = None,
    cursor: str | None = None,
    limit: int = 50,
    parent: str | None = None,
    include_shards: bool = False,
) -> Page:
    """The jobs `owner` may see (None: every owner's), newest first, `limit` at a time;
    pass a page's next_cursor to get the page after it (InvalidRequest for a bad cursor).
    `tags`: only jobs carrying every one ((key, value), or (key, None) for any value).
    The shards of sharded jobs are left out unless `include_shards`, or `parent` names
    the job whose shards to list."""
    query = owned.visible(Job, owner, Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    query = query.options(selectinload(Job.tag_rows))  # one query for the page's tags
    if tags:
        query = query.where(job_tags.matching(tags))
    if parent is not None:
        query = query.where(Job.parent_id == parent)
    elif not include_shards:
        query = query.where(Job.parent_id.is_(None))
    if state is not None:
        query = query.where(Job.state == state)
    if kind:
        query = query.where(Job.kind == kind)
    if cursor:
        created_at, job_id = _decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id))
        )
    rows = list(session.scalars(query))
    page, more = rows[:limit], len(rows) > limit
    return Page(page, _encode_cursor(page[-1]) if more else None)


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, job_id = base64.urlsafe_b64decode(cursor).decode().split("|", 1)
        when = datetime.fromisoformat(created_at)
        if when.tzinfo is None:  # the API's cursors carry an offset; a naive one would 500
            raise ValueError("cursor time has no UTC offset")
        return when, job_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("cursor is not one this API returned") from None


def metric_points(session: Session, job_id: str) -> list[Metric]:
    """The job's metric points, by name then step."""
    return list(
        session.scalars(
            select(Metric).where(Metric.job_id == job_id).order_by(Metric.name, Metric.step)
        )
    )


def has_metrics(session: Session, job_id: str) -> bool:
    """Whether the job reported any metric point."""
    query = select(Metric.job_id).where(Metric.job_id == job_id).limit(1)
    return session.scalar(query) is not None


def events(session: Session, job_id: str, *, after: int = 0, limit: int = 500) -> list[JobEvent]:
    """The job's log lines after the one with id `after`, oldest first."""
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(limit)
        )
    )


def event_tail(session: Session, job_id: str, limit: int) -> list[JobEvent]:
    """The job's newest `limit` log lines, oldest first."""
    newest = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(limit)
    )
    return list(newest)[::-1]


def existing_ids(session: Session, ids: Collection[str]) -> set[str]:
    """Which of `ids` are jobs that still exist (one query; lineage links to deleted jobs
    are shown as plain ids)."""
    if not ids:
        return set()
    return set(session.scalars(select(Job.id).where(Job.id.in_(list(ids)))))
