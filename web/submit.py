"""Queue a validated job: the one path POST /api/v1/jobs and the UI's job forms share.

The rules and the order of writes are db.submission's, which the scheduler uses too: the
per-owner quota, then the row committed, the broker message, sent_at.
"""

from __future__ import annotations

from flask import current_app
from sqlalchemy.orm import Session

from db import jobs, submission
from db.models import Job
from kiln.batch_retry import why_not_retryable
from kiln.errors import InvalidSpec, NotFound
from kiln.settings import Settings
from kiln.specs import BatchPredictSpec, Spec
from kiln.webhooks import Webhook
from web import dispatch


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
    """Create, commit and send the job; QueueQuotaExceeded (429) when the owner is at quota;
    InvalidSpec (422) when a batch_predict's retry_of names no job it can retry.

    `expires_after_s` None keeps its outputs and log lines KILN_RETENTION_DAYS.
    A commit that loses a unique-key race (IntegrityError) propagates: the API answers it
    with the job that won.
    """
    settings: Settings = current_app.config["KILN_SETTINGS"]
    if isinstance(spec, BatchPredictSpec) and spec.retry_of is not None:
        _check_retry_source(db, owner, spec.retry_of)
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


def _check_retry_source(db: Session, owner: str, source_id: str) -> None:
    """A batch_predict's retry_of must name a job of the same owner that can be retried."""
    try:
        source = jobs.get_owned(db, source_id, owner)
    except NotFound:
        problem: str | None = f"no job {source_id} of yours"
    else:
        problem = why_not_retryable(source.id, source.kind, source.state, source.result)
    if problem is not None:
        raise InvalidSpec(
            f"spec.retry_of: {problem}", [{"loc": ["spec", "retry_of"], "msg": problem}]
        )
