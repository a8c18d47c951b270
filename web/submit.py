"""Queue a validated job: the one path POST /api/v1/jobs and the UI's job forms share.

Both must apply the same per-owner quota and the same order of writes (row committed,
then the broker message, then sent_at), so the reconciler treats their jobs alike.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from db import jobs
from db.models import Job
from kiln import routing
from kiln.specs import Spec
from web import dispatch, limits


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
) -> Job:
    """Create, commit and send the job; QueueQuotaExceeded (429) when the owner is at quota.

    A commit that loses a unique-key race (IntegrityError) propagates: the API answers it
    with the job that won.
    """
    limits.check_queue_quota(jobs.count_queued(db, owner))
    job = jobs.create(
        db,
        kind=kind,
        owner=owner,
        spec=spec.model_dump(mode="json"),
        queue=routing.queue_for(spec),
        priority=priority,
        idempotency_key=idempotency_key,
        idempotency_fingerprint=idempotency_fingerprint,
        preemptible=preemptible,
    )
    db.commit()
    # sent_at tells the reconciler the message went out; unsent jobs are resent by it.
    if dispatch.send_job(job):
        jobs.mark_sent(db, job.id, job.attempt)
        db.commit()
    return job
