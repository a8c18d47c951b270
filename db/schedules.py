"""Schedules: cron arithmetic (UTC) and the rows' lifecycle; firing is a compare-and-set.

A schedule fires by moving its next_run_at forward with a conditional UPDATE (from the time
it was due to the next cron time after now) and creating its job in the same transaction,
so two scheduler processes can never fire one slot twice, and a scheduler that was down for
several slots fires once when it comes back, not once per missed slot.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from croniter import croniter
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db import jobs, owned, submission
from db.base import utcnow
from db.models import ApiKey, Job, Schedule
from kiln.errors import InvalidSpec
from kiln.specs import parse_spec
from kiln.webhooks import DEFAULT_EVENTS, Event, Webhook


def check_cron(expression: str) -> str:
    """The expression, if it is a valid five-field cron line; InvalidSpec otherwise."""
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise InvalidSpec(
            f"cron {expression!r} is not a five-field cron expression (minute hour day "
            "month weekday), such as '0 2 * * *' for 02:00 UTC every day",
            [{"loc": ["cron"], "msg": "invalid cron expression"}],
        )
    return expression


def next_after(expression: str, when: datetime) -> datetime:
    """The first time strictly after `when` that matches `expression` (UTC)."""
    found = croniter(expression, when.astimezone(UTC)).get_next(datetime)
    return found.astimezone(UTC)


def upcoming(expression: str, after: datetime, count: int) -> list[datetime]:
    """The next `count` times after `after`."""
    times: list[datetime] = []
    for _ in range(count):
        after = next_after(expression, after)
        times.append(after)
    return times


def create(
    session: Session,
    *,
    owner: str,
    name: str,
    cron: str,
    kind: str,
    spec: dict[str, Any],
    priority: int,
    enabled: bool,
    webhook: Webhook | None = None,
    tags: dict[str, str] | None = None,
    deadline_s: float | None = None,
    expires_after_s: int | None = None,
) -> Schedule:
    """Validate the cron line and the job template (the kind's spec, as POST /jobs does)."""
    check_cron(cron)
    template = parse_spec(kind, spec).model_dump(mode="json")
    now = utcnow()
    schedule = Schedule(
        owner=owner,
        name=name,
        cron=cron,
        kind=kind,
        spec=template,
        priority=priority,
        enabled=enabled,
        webhook_url=webhook.url if webhook else None,
        webhook_events=list(webhook.events) if webhook else None,
        tags=tags or None,
        deadline_s=deadline_s,
        expires_after_s=expires_after_s,
        next_run_at=next_after(cron, now),
        created_at=now,
    )
    session.add(schedule)
    session.flush()
    return schedule


def get_owned(session: Session, schedule_id: str, owner: str | None) -> Schedule:
    return owned.get_owned(session, Schedule, schedule_id, owner)


def listed(session: Session, owner: str | None) -> list[Schedule]:
    return list(session.scalars(owned.visible(Schedule, owner, Schedule.created_at, Schedule.id)))


def set_enabled(session: Session, schedule: Schedule, enabled: bool) -> Schedule:
    """Pause or resume. Resuming counts from now: slots passed while paused never fire."""
    if enabled and not schedule.enabled:
        schedule.next_run_at = next_after(schedule.cron, utcnow())
    schedule.enabled = enabled
    session.flush()
    return schedule


def due(session: Session, now: datetime) -> list[Schedule]:
    """Enabled schedules whose time has come, of owners who still hold a live key: once all
    of an owner's keys are revoked, nothing runs on their behalf (restoring access fires a
    missed slot once, as after a scheduler outage)."""
    owner_active = (
        select(ApiKey.id)
        .where(ApiKey.owner == Schedule.owner, ApiKey.revoked_at.is_(None))
        .exists()
    )
    return list(
        session.scalars(
            select(Schedule).where(
                Schedule.enabled.is_(True), Schedule.next_run_at <= now, owner_active
            )
        )
    )


def fire(
    session: Session,
    schedule: Schedule,
    was_due: datetime,
    next_run_at: datetime,
    *,
    max_queued: int,
    expires_after_s: int | None = None,
) -> Job | None:
    """Move the schedule from `was_due` to `next_run_at` and create its job (kept for the
    schedule's expires_after_s, else `expires_after_s`), if this caller wins the move; the
    caller commits, then sends the job (db.submission.commit_and_send).

    The job is queued by the same rules as POST /jobs (db.submission.queue_job): an owner
    at quota gets QueueQuotaExceeded, and the caller rolls back, then skip()s the slot.
    """
    if not _advance(session, schedule, was_due, next_run_at, last_run_at=utcnow()):
        return None
    spec = parse_spec(schedule.kind, schedule.spec)
    job = submission.queue_job(
        session,
        owner=schedule.owner,
        kind=schedule.kind,
        spec=spec,
        priority=schedule.priority,
        max_queued=max_queued,
        # The schedule's own expires_after, else the caller's default (the retention).
        expires_after_s=schedule.expires_after_s or expires_after_s,
        webhook=template_webhook(schedule),
        tags=schedule.tags,
        deadline_s=schedule.deadline_s,
    )
    jobs.log(session, job.id, f"submitted by schedule {schedule.name!r} ({schedule.cron})")
    session.execute(
        update(Schedule).where(Schedule.id == schedule.id).values(last_job_id=job.id),
        execution_options={"synchronize_session": False},
    )
    return job


def template_webhook(schedule: Schedule) -> Webhook | None:
    """The webhook the schedule's jobs get (its URL is checked again at each delivery)."""
    if schedule.webhook_url is None:
        return None
    events = cast(tuple[Event, ...], tuple(schedule.webhook_events or DEFAULT_EVENTS))
    return Webhook(schedule.webhook_url, events)


def skip(session: Session, schedule: Schedule, was_due: datetime, next_run_at: datetime) -> bool:
    """Move the schedule past `was_due` without a job (its owner was at the queue quota);
    True if this caller won the move. last_run_at and last_job_id keep naming the last
    slot that did create a job."""
    return _advance(session, schedule, was_due, next_run_at)


def _advance(
    session: Session,
    schedule: Schedule,
    was_due: datetime,
    next_run_at: datetime,
    **values: Any,
) -> bool:
    """The compare-and-set from `was_due` to `next_run_at`: True for the one caller that wins."""
    # Session.execute is typed as returning a Result; an UPDATE's is a CursorResult.
    won = session.execute(
        update(Schedule)
        .where(
            Schedule.id == schedule.id,
            Schedule.enabled.is_(True),
            Schedule.next_run_at == was_due,
        )
        .values(next_run_at=next_run_at, **values),
        execution_options={"synchronize_session": False},
    ).rowcount  # type: ignore[attr-defined]
    return bool(won == 1)
