"""GET /api/v1/workers (admin): the live workers, from their presence records in Redis
(kiln/presence.py) and, for the job each runs, the job rows."""

from __future__ import annotations

from datetime import datetime

from flask import Response

from db import jobs
from db.models import Job
from kiln import presence
from kiln.presence import Presence
from kiln.schemas import WorkerJob, WorkerList, WorkerOut
from web import live_workers, session
from web.api import bp
from web.api.body import answer
from web.auth import require_admin


@bp.get("/workers")
@require_admin
def list_workers() -> Response:
    live = live_workers.read()
    running = jobs.running_on(session.get(), [w.name for w in live])
    now = presence.now()
    return answer(WorkerList(workers=[_out(w, running.get(w.name), now) for w in live]))


def _out(worker: Presence, job: Job | None, now: datetime) -> WorkerOut:
    if job is not None and (job.started_at is None or job.started_at < worker.started_at):
        job = None  # claimed by an earlier process of this name (the worker was restarted)
    current = WorkerJob.model_validate(job, from_attributes=True) if job is not None else None
    age = max(0.0, (now - worker.heartbeat_at).total_seconds())
    return WorkerOut(**worker.model_dump(), heartbeat_age_s=round(age, 3), job=current)
