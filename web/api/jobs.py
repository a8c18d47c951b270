"""Jobs: submit, list, read, cancel, delete; a job's metrics, log lines, output and error
files."""

from __future__ import annotations

import hashlib
import json

from flask import Response, request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import jobs, queue_estimate, shards
from db.models import Job
from kiln.errors import InvalidRequest, KilnError
from kiln.schemas import (
    EventOut,
    EventPage,
    JobOut,
    JobPage,
    JobSubmission,
    MetricPoint,
    MetricSeries,
    ShardOut,
)
from kiln.specs import parse_spec
from kiln.states import JobState
from kiln.tags import MAX_TAGS, parse_filter
from web import live_workers, session, storage, webhooks
from web.api import bp
from web.api.body import answer, json_body, parse
from web.auth import principal
from web.submit import submit

_MAX_PAGE = 200
_MAX_IDEMPOTENCY_KEY = 255


class IdempotencyKeyReused(KilnError):
    status, code = 422, "idempotency_key_reused"


class IdempotentRequestInFlight(KilnError):
    status, code = 409, "request_in_flight"


@bp.post("/jobs")
def submit_job() -> Response:
    """Submit a job. With an Idempotency-Key header a retry returns the first job (see
    docs/reliability.md): same key and body → that job; other body → 422; first request
    not yet sent → 409."""
    key = _idempotency_key()
    submission = parse(JobSubmission)
    spec = parse_spec(submission.kind, submission.spec)
    owner = principal().owner
    fingerprint = _fingerprint() if key else None
    db = session.get()
    if key and (earlier := jobs.find_idempotent(db, owner, key)) is not None:
        return _replay(earlier, fingerprint)
    webhook = webhooks.checked(submission.webhook)
    try:
        job = submit(
            db,
            owner=owner,
            kind=submission.kind,
            spec=spec,
            priority=submission.priority,
            preemptible=submission.preemptible,
            expires_after_s=submission.expires_after,
            tags=submission.tags,
            deadline_s=submission.deadline_s,
            idempotency_key=key,
            idempotency_fingerprint=fingerprint,
            webhook=webhook,
        )
    except IntegrityError:
        # A concurrent request with the same key won the unique (owner, key) constraint.
        db.rollback()
        earlier = jobs.find_idempotent(db, owner, key) if key else None
        if earlier is None:
            raise
        return _replay(earlier, fingerprint)
    return answer(JobOut.model_validate(job), 202, {"Location": f"/api/v1/jobs/{job.id}"})


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= _MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters")
    return key


def _fingerprint() -> str:
    """sha256 of the body as canonical JSON: key order and whitespace do not matter."""
    canonical = json.dumps(json_body(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(earlier: Job, fingerprint: str | None) -> Response:
    """Answer a repeated Idempotency-Key with the first request's job, or say why not."""
    if earlier.idempotency_fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used with a different request body; use a new key"
        )
    if earlier.state == JobState.QUEUED and earlier.attempt == 0 and earlier.sent_at is None:
        raise IdempotentRequestInFlight(
            "the first request with this Idempotency-Key is still being processed; retry"
        )
    location = {"Location": f"/api/v1/jobs/{earlier.id}"}
    return answer(JobOut.model_validate(earlier), 200, location)


@bp.get("/jobs")
def list_jobs() -> Response:
    """Jobs newest first; the shards of sharded jobs only with ?include_shards=true, or
    ?parent=<id> for one job's shards."""
    limit = _int_arg("limit", 50, 1, _MAX_PAGE)
    state = request.args.get("state")
    if state and state not in {s.value for s in JobState}:
        raise InvalidRequest(f"unknown state {state!r}")
    page = jobs.listed(
        session.get(),
        principal().visible_owner,
        state=JobState(state) if state else None,
        kind=request.args.get("kind"),
        tags=_tag_filters(),
        cursor=request.args.get("cursor"),
        limit=limit,
        parent=request.args.get("parent") or None,
        include_shards=_bool_arg("include_shards"),
    )
    return answer(
        JobPage(jobs=[JobOut.model_validate(j) for j in page.jobs], next_cursor=page.next_cursor)
    )


def _tag_filters() -> list[tuple[str, str | None]]:
    """?tag=team:nlp&tag=env (repeatable; every one must match)."""
    given = request.args.getlist("tag")
    if len(given) > MAX_TAGS:
        raise InvalidRequest(f"at most {MAX_TAGS} tag filters")
    try:
        return [parse_filter(text) for text in given]
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    """The job; while it is queued, with its queue position and estimated start."""
    job = _owned(job_id)
    out = with_shards(session.get(), job)
    if (standing := queue_estimate.estimate(session.get(), job, live_workers.slots)) is not None:
        out.queue_position = standing.position
        out.estimated_start_at = standing.estimated_start_at
    return answer(out)


def with_shards(db: Session, job: Job) -> JobOut:
    """The job as the API shows it; a sharded job that split also lists its shards, and
    while they run its progress and status line are their combined ones, read now."""
    out = JobOut.model_validate(job)
    if job.shard_count is None:
        return out
    children = shards.children(db, job.id)
    combined = shards.summary(job, children)
    out.shards = [
        ShardOut(id=s.id, index=s.index, state=s.state, rows=s.rows, rows_done=s.rows_done)
        for s in combined.shards
    ]
    if job.awaiting_shards and job.state == JobState.RUNNING:
        out.progress, out.message = combined.progress, combined.message
    return out


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    """Cancel a job (a sharded job's shards with it; a shard cancelled alone cancels its
    sharded job)."""
    db = session.get()
    job = jobs.request_cancel(db, _owned(job_id))
    db.commit()
    return answer(JobOut.model_validate(job), 202)


@bp.delete("/jobs/<job_id>")
def delete_job(job_id: str) -> Response:
    """Delete a finished job with its log lines, metrics, output files and scratch: 409
    illegal_transition while it is queued or running, 409 in_use while a live job resumes
    from it. A model version it trained stays."""
    storage.delete_job(session.get(), _owned(job_id))
    return Response(status=204)


@bp.get("/jobs/<job_id>/metrics")
def job_metrics(job_id: str) -> Response:
    job = _owned(job_id)
    series: dict[str, list[MetricPoint]] = {}
    for point in jobs.metric_points(session.get(), job.id):
        series.setdefault(point.name, []).append(
            MetricPoint(step=point.step, value=point.value, at=point.at)
        )
    return answer(MetricSeries(job_id=job.id, series=series))


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    """Log lines in order; pass ?after=<last id seen> to follow the tail."""
    job = _owned(job_id)
    after = _int_arg("after", 0, 0, 2**62)
    limit = _int_arg("limit", 500, 1, 5000)
    found = jobs.events(session.get(), job.id, after=after, limit=limit)
    return answer(EventPage(events=[EventOut.model_validate(e) for e in found]))


@bp.get("/jobs/<job_id>/deliveries")
def job_deliveries(job_id: str) -> Response:
    """The job's webhook messages and every attempt to deliver each (docs/webhooks.md)."""
    return answer(webhooks.deliveries(session.get(), _owned(job_id).id))


@bp.get("/jobs/<job_id>/output")
def job_output(job_id: str) -> Response:
    """The job's output file (a batch_predict's predictions), streamed."""
    return storage.send_result_file(_owned(job_id), "output")


@bp.get("/jobs/<job_id>/errors")
def job_errors(job_id: str) -> Response:
    """The job's error file: one JSON line per input row that could not be scored."""
    return storage.send_result_file(_owned(job_id), "error_file")


def _owned(job_id: str) -> Job:
    return jobs.get_owned(session.get(), job_id, principal().visible_owner)


def _bool_arg(name: str) -> bool:
    raw = request.args.get(name, "false").lower()
    if raw not in {"true", "false", "1", "0"}:
        raise InvalidRequest(f"{name} must be true or false")
    return raw in {"true", "1"}


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}")
    return value
