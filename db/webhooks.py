"""Webhooks in the database: the outbox written with each state change, the owners' signing
secrets, and the claims and outcomes of delivery processes (workers/deliver.py).

The outbox row of an event is inserted by the statement's own transaction: db.jobs makes
every state change with one UPDATE … RETURNING, and hands the returned row here
(on_transition, on_progress). So a change that commits has its message, and a change
rolled back (or lost to another attempt) has none.

Delivery processes claim due messages with a lease (a compare-and-set on the row, after a
`SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL so that several never queue on one row).
A process that dies holding a lease only delays its messages: once the lease runs out the
next claim takes them again, and records the lost attempt.
"""

from __future__ import annotations

import functools
import json
import uuid
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import Insert, Row, Table, and_, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.base import utcnow
from db.models import Job, WebhookDelivery, WebhookMessage, WebhookSecret
from kiln import webhooks
from kiln.states import JobState

#: The job columns every state change returns: what an event's body and message need.
RETURNED = (
    Job.id,
    Job.owner,
    Job.kind,
    Job.state,
    Job.attempt,
    Job.progress,
    Job.message,
    Job.error_type,
    Job.error_message,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.webhook_url,
    Job.webhook_events,
)

#: A row of RETURNED columns (any more columns before them, as db.jobs.report adds).
JobRow = Row[*tuple[Any, ...]]

#: The event each state a job moves to announces (queued, after a lost worker or a
#: transient error, announces nothing: the job is still on its way).
EVENT_OF_STATE: dict[str, webhooks.Event] = {
    JobState.RUNNING: "running",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}

#: Progress events are coalesced: at most one per PROGRESS_EVERY_S per job, and only when
#: the whole percent changed since the last one sent (a runner reports every 0.5 s).
PROGRESS_EVERY_S = 5.0


def on_transition(session: Session, job: JobRow) -> None:
    """Queue the event of the state `job` (a RETURNED row) just moved to, if it asked."""
    event = EVENT_OF_STATE.get(job.state)
    if event is not None and job.webhook_url and webhooks.subscribed(job.webhook_events, event):
        _enqueue(session, event, job, utcnow())


def on_progress(session: Session, job: JobRow, now: datetime | None = None) -> bool:
    """Queue a progress event for `job` (a RETURNED row, after its progress was written)
    if it asked for them and one is due; True if one was queued."""
    if not job.webhook_url or not webhooks.subscribed(job.webhook_events, "progress"):
        return False
    now = now or utcnow()
    last = session.execute(
        select(WebhookMessage.created_at, WebhookMessage.body)
        .where(WebhookMessage.job_id == job.id, WebhookMessage.event == "progress")
        .order_by(WebhookMessage.created_at.desc())
        .limit(1)
    ).one_or_none()
    if last is None:
        # As if 0% had been sent: the first event comes at the first whole percent.
        if int(job.progress * 100) == 0:
            return False
    else:
        sent_progress = float(json.loads(last.body)["data"]["progress"])
        if not progress_due(last.created_at, sent_progress, now, job.progress):
            return False
    _enqueue(session, "progress", job, now)
    return True


def progress_due(last_at: datetime, last_progress: float, now: datetime, progress: float) -> bool:
    """Whether a progress event is due: the last was PROGRESS_EVERY_S ago or more, and the
    whole percent has changed since."""
    waited = (now - last_at).total_seconds() >= PROGRESS_EVERY_S
    return waited and int(progress * 100) != int(last_progress * 100)


def _enqueue(session: Session, event: webhooks.Event, job: JobRow, now: datetime) -> None:
    error = {"type": job.error_type, "message": job.error_message or ""} if job.error_type else None
    data = {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "attempt": job.attempt,
        "progress": job.progress,
        "message": job.message,
        "error": error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
    session.execute(
        insert(cast(Table, WebhookMessage.__table__)),
        {
            "id": "msg_" + uuid.uuid4().hex,
            "job_id": job.id,
            "owner": job.owner,
            "event": event,
            "url": job.webhook_url,
            "body": webhooks.body(event, now, data),
            "state": "pending",
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
        },
    )


# --- secrets ---------------------------------------------------------------------------


def secret_of(session: Session, owner: str) -> WebhookSecret:
    """The owner's secrets row, created (with a fresh secret) the first time it is needed;
    two processes creating it at once both end up reading the one that won."""
    row = session.get(WebhookSecret, owner)
    if row is None:
        now = utcnow()
        values = {"owner": owner, "secret": webhooks.new_secret(), "created_at": now}
        session.execute(_insert_if_absent(session.get_bind().dialect.name), values)
        row = session.get_one(WebhookSecret, owner, populate_existing=True)
    return row


def signing_secrets(session: Session, owner: str, now: datetime | None = None) -> list[str]:
    """The secrets that sign the owner's deliveries now: the current one, and the one it
    replaced while that one's grace period lasts."""
    row = secret_of(session, owner)
    now = now or utcnow()
    still_valid = row.previous_until is not None and row.previous_until > now
    return [row.secret, *([row.previous_secret] if row.previous_secret and still_valid else [])]


def rotate(session: Session, owner: str, grace: timedelta) -> WebhookSecret:
    """Replace the owner's secret; the old one keeps signing (beside the new) for `grace`."""
    secret_of(session, owner)
    row = session.get_one(WebhookSecret, owner, with_for_update=True, populate_existing=True)
    now = utcnow()
    row.previous_secret, row.previous_until = row.secret, now + grace
    row.secret, row.rotated_at = webhooks.new_secret(), now
    session.flush()
    return row


@functools.cache
def _insert_if_absent(dialect: str) -> Insert:
    insert_into = postgresql_insert if dialect == "postgresql" else sqlite_insert
    return insert_into(cast(Table, WebhookSecret.__table__)).on_conflict_do_nothing(
        index_elements=["owner"]
    )


# --- delivery ----------------------------------------------------------------------------


class Claimed(NamedTuple):
    """A message a delivery process holds, and the attempt it is about to make."""

    id: str
    owner: str
    url: str
    body: str
    created_at: datetime
    #: This attempt's number (1 for the first).
    attempt: int
    #: The claim's token: only its holder may schedule the next attempt.
    token: str


#: Recorded for an attempt whose process died before it could record an answer.
LOST_ATTEMPT = "no answer recorded: the delivery process stopped (its lease ran out)"


def claim(session: Session, *, lease: timedelta, limit: int) -> list[Claimed]:
    """Take up to `limit` due messages for `lease`, oldest due first; the caller commits."""
    now = utcnow()
    free = or_(WebhookMessage.lease_until.is_(None), WebhookMessage.lease_until <= now)
    due = and_(WebhookMessage.state == "pending", WebhookMessage.next_attempt_at <= now, free)
    candidates = session.execute(
        select(WebhookMessage.id, WebhookMessage.lease_until)
        .where(due)
        .order_by(WebhookMessage.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer at a time
    ).all()
    token = uuid.uuid4().hex
    claimed = []
    for message_id, held_until in candidates:
        row = session.execute(
            update(WebhookMessage)
            .where(WebhookMessage.id == message_id, due)
            .values(
                lease_until=now + lease,
                lease_token=token,
                attempts=WebhookMessage.attempts + 1,
            )
            .returning(
                WebhookMessage.id,
                WebhookMessage.owner,
                WebhookMessage.url,
                WebhookMessage.body,
                WebhookMessage.created_at,
                WebhookMessage.attempts,
            ),
            execution_options={"synchronize_session": False},
        ).one_or_none()
        if row is None:
            continue  # another delivery process took it meanwhile
        if held_until is not None:
            _attempt(session, message_id, row.attempts - 1, now, None, None, LOST_ATTEMPT)
        claimed.append(Claimed(*row, token=token))
    return claimed


def delivered(
    session: Session, message: Claimed, status: int, latency_ms: float, at: datetime
) -> None:
    """Record an attempt the receiver answered with a 2xx: the message is delivered (even
    if this claim's lease ran out meanwhile: the receiver has it)."""
    _attempt(session, message.id, message.attempt, at, status, latency_ms, None)
    session.execute(
        update(WebhookMessage)
        .where(WebhookMessage.id == message.id, WebhookMessage.state == "pending")
        .values(state="delivered", delivered_at=utcnow(), lease_until=None, lease_token=None),
        execution_options={"synchronize_session": False},
    )


def not_delivered(
    session: Session,
    message: Claimed,
    at: datetime,
    *,
    status: int | None,
    latency_ms: float | None,
    error: str,
    retry_at: datetime | None,
) -> None:
    """Record a failed attempt, and release the message to be tried again at `retry_at`
    (None: give up; it is `failed`). Only the claim that still holds the lease does the
    latter: after it ran out, whoever took the message over decides."""
    _attempt(session, message.id, message.attempt, at, status, latency_ms, error)
    after: dict[str, Any] = (
        {"next_attempt_at": retry_at} if retry_at is not None else {"state": "failed"}
    )
    session.execute(
        update(WebhookMessage)
        .where(
            WebhookMessage.id == message.id,
            WebhookMessage.state == "pending",
            WebhookMessage.lease_token == message.token,
        )
        .values(lease_until=None, lease_token=None, **after),
        execution_options={"synchronize_session": False},
    )


def _attempt(
    session: Session,
    message_id: str,
    number: int,
    at: datetime,
    status: int | None,
    latency_ms: float | None,
    error: str | None,
) -> None:
    session.execute(
        insert(cast(Table, WebhookDelivery.__table__)),
        {
            "message_id": message_id,
            "number": number,
            "at": at,
            "status_code": status,
            "latency_ms": latency_ms,
            "error": error,
        },
    )


def messages_of(
    session: Session, job_id: str
) -> list[tuple[WebhookMessage, list[WebhookDelivery]]]:
    """The job's messages, oldest first, each with its attempts in order."""
    messages = list(
        session.scalars(
            select(WebhookMessage)
            .where(WebhookMessage.job_id == job_id)
            .order_by(WebhookMessage.created_at, WebhookMessage.id)
        )
    )
    attempts: dict[str, list[WebhookDelivery]] = {m.id: [] for m in messages}
    if messages:
        for attempt in session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.message_id.in_(list(attempts)))
            .order_by(WebhookDelivery.number, WebhookDelivery.id)
        ):
            attempts[attempt.message_id].append(attempt)
    return [(m, attempts[m.id]) for m in messages]
