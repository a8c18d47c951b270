"""GET /api/v1/jobs/<id>/stream: the job's state, progress, metric points and log lines as
Server-Sent Events (web/job_streams.py), resuming from Last-Event-ID or ?after=."""

from __future__ import annotations

from flask import Response, request

from db import jobs
from web import job_streams, session
from web.api import bp
from web.auth import principal


@bp.get("/jobs/<job_id>/stream")
def job_stream(job_id: str) -> Response:
    job = jobs.get_owned(session.get(), job_id, principal().visible_owner)
    token = request.headers.get("Authorization", "").partition(" ")[2].strip()
    raw = request.headers.get("Last-Event-ID") or request.args.get("after")
    return job_streams.respond(job.id, job_streams.caller_digest(token), raw)
