"""The one way a job is queued and its message sent, for the web, the scheduler and workers.

The order of writes is the contract the reconciler relies on: the row is committed first
(a message never names a job the database does not hold), then the message goes to the
broker, then `sent_at` records it. A send that fails leaves the job queued with the old
(or no) `sent_at`, and the reconciler sends it again: the row, not the message, is the
record of the request.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.orm import Session

from db import jobs
from db.base import utcnow
from db.models import Job
from kiln import routing
from kiln.broker import Sender
from kiln.errors import QueueQuotaExceeded
from kiln.specs import Spec
from kiln.webhooks import Webhook

log = logging.getLogger(__name__)


def check_queue_quota(session: Session, owner: str, max_queued: int) -> None:
    """QueueQuotaExceeded when `owner` already has `max_queued` jobs waiting."""
    queued = jobs.count_queued(session, owner)
    if queued >= max_queued:
        raise QueueQuotaExceeded(
            f"you have {queued} jobs waiting, the most allowed "
            f"(max_queued_per_owner={max_queued}); wait for some to start or cancel some"
        )


def queue_job(
    session: Session,
    *,
    owner: str,
    kind: str,
    spec: Spec,
    priority: int,
    max_queued: int,
    idempotency_key: str | None = None,
    idempotency_fingerprint: str | None = None,
    preemptible: bool = True,
    expires_after_s: int | None = None,
    webhook: Webhook | None = None,
    tags: dict[str, str] | None = None,
    deadline_s: float | None = None,
) -> Job:
    """Apply the submit rules (the owner's queue quota) and insert the queued job, flushed
    but not committed; commit_and_send() then makes it real. `expires_after_s`: the
    submission's, else KILN_RETENTION_DAYS (the caller's settings.retention_s)."""
    check_queue_quota(session, owner, max_queued)
    return jobs.create(
        session,
        kind=kind,
        owner=owner,
        spec=spec.model_dump(mode="json"),
        queue=routing.queue_for(spec),
        priority=priority,
        idempotency_key=idempotency_key,
        idempotency_fingerprint=idempotency_fingerprint,
        preemptible=preemptible,
        expires_after_s=expires_after_s,
        webhook=webhook,
        tags=tags,
        deadline_s=deadline_s,
    )


def commit_and_send(session: Session, send: Sender, job: Job, *, delay_s: float = 0.0) -> bool:
    """Commit the session (which holds the queued job), send the job's message (delivered
    after `delay_s`), then record `sent_at`; True if the message went out.

    A failed send is logged, not raised: the job is committed and queued, and the
    reconciler sends it again. A commit that fails (a unique-key race, the database down)
    raises, and nothing was sent.
    """
    session.commit()
    try:
        send(job, delay_s)
    except Exception:
        log.exception("job=%s event=send_failed (the reconciler will send it again)", job.id)
        return False
    jobs.mark_sent(session, job.id, job.attempt, utcnow() + timedelta(seconds=delay_s))
    session.commit()
    return True
