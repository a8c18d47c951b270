"""Queue a validated job: the one path POST /api/v1/jobs and the UI's job forms share.

The rules and the order of writes are db.submission's, which the scheduler uses too: the
per-owner quota, then the row committed, the broker message, sent_at.
"""

from __future__ import annotations

from flask import current_app
from sqlalchemy.orm import Session

from db import submission
from db.models import Job
from kiln.settings import Settings
from kiln.specs import Spec
from kiln.webhooks import Webhook
from web import dispatch
from web.submit_checks import check_references


def submit(
    db: Session,
    *,
    owner: str,
    kind: str,
    spec: Spec,
    priority: int,
    idempotency_key: str | None = None,
    idempotency_fingerprint: str | None = None,
    preemptible: bool = True,
    expires_after_s: int | None = None,
    webhook: Webhook | None = None,
    tags: dict[str, str] | None = None,
    deadline_s: float | None = None,
) -> Job:
    """Create, commit and send the job; InvalidSpec (422) when the spec names what the
    owner does not have or cannot use (web.submit_checks), QueueQuotaExceeded (429) when
    the owner is at quota.

    `expires_after_s` None keeps its outputs and log lines KILN_RETENTION_DAYS.
    A commit that loses a unique-key race (IntegrityError) propagates: the API answers it
    with the job that won.
    """
    settings: Settings = current_app.config["KILN_SETTINGS"]
    check_references(db, owner, spec)
    job = submission.queue_job(
        db,
        owner=owner,
        kind=kind,
        spec=spec,
        priority=priority,
        max_queued=settings.max_queued_per_owner,
        idempotency_key=idempotency_key,
        idempotency_fingerprint=idempotency_fingerprint,
        preemptible=preemptible,
        expires_after_s=expires_after_s or settings.retention_s,
        webhook=webhook,
        tags=tags,
        deadline_s=deadline_s,
    )
    submission.commit_and_send(db, dispatch.sender(), job)
    return job
