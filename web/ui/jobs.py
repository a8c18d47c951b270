"""Jobs pages: the list (live, a page at a time), one job (live status, log, chart data),
cancel, downloads."""

from __future__ import annotations

import json
from typing import Any

from flask import abort, jsonify, redirect, render_template, request, url_for
from werkzeug import Response

from db import jobs as job_store
from db import shards as shard_store
from db.models import Job
from kiln.specs import KINDS
from kiln.states import JobState
from web import session, storage
from web.ui import auth, bp

_LIST_LIMIT = 100
_LOG_TAIL = 200
_STATES = [s.value for s in JobState]

#: What a job page offers for download: name in the UI's URL → the result entry that
#: describes the file. web.storage serves it, as it does for the API: the same bytes.
DOWNLOADS: dict[str, str] = {"output": "output", "errors": "error_file"}


@bp.get("/jobs")
@auth.signed_in
def jobs() -> str:
    return render_template("jobs.html", **_listing())


@bp.get("/jobs/table")
@auth.signed_in
def jobs_table() -> str:
    """The table alone: what the list page's htmx poll swaps in."""
    return render_template("_jobs_table.html", **_listing())


def _listing() -> dict[str, Any]:
    state = request.args.get("state", "")
    kind = request.args.get("kind", "")
    cursor = request.args.get("cursor") or None
    page = job_store.listed(
        session.get(),
        auth.current().visible_owner,
        state=JobState(state) if state in _STATES else None,
        kind=kind or None,
        cursor=cursor,
        limit=_LIST_LIMIT,
    )
    return {
        "jobs": page.jobs,
        "cursor": cursor,
        "next_cursor": page.next_cursor,
        "state": state if state in _STATES else "",
        "kind": kind,
        "states": _STATES,
        "kinds": sorted(KINDS),
        "limit": _LIST_LIMIT,
    }


@bp.get("/jobs/<job_id>")
@auth.signed_in
def job(job_id: str) -> str:
    found = _owned(job_id)
    return render_template(
        "job.html",
        job=found,
        spec_json=json.dumps(found.spec, indent=2),
        **_status(found),
        **_log(found),
        # Charts for a training job, or for any job that has points to draw.
        has_metrics=job_store.has_metrics(session.get(), found.id),
    )


@bp.get("/jobs/<job_id>/live")
@auth.signed_in
def job_live(job_id: str) -> str:
    """Status and result: what the job page's htmx poll swaps in."""
    found = _owned(job_id)
    return render_template("_job_live.html", job=found, **_status(found))


@bp.get("/jobs/<job_id>/log")
@auth.signed_in
def job_log(job_id: str) -> str:
    """The log tail: what the job page's other htmx poll swaps in."""
    found = _owned(job_id)
    terminal = JobState(found.state).is_terminal
    return render_template("_job_log.html", job=found, terminal=terminal, **_log(found))


def _status(found: Job) -> dict[str, Any]:
    return {
        "terminal": JobState(found.state).is_terminal,
        "result_json": json.dumps(found.result, indent=2) if found.result else "",
        "downloads": _downloads(found),
        "shards": _shards(found),
    }


def _shards(found: Job) -> shard_store.Summary | None:
    """A sharded job's shards and their combined progress (None for any other job)."""
    if found.shard_count is None:
        return None
    return shard_store.summary(found, shard_store.children(session.get(), found.id))


def _downloads(found: Job) -> dict[str, dict[str, Any]]:
    """The files the job has: those whose result entry names a stored file (a digest)."""
    offered: dict[str, dict[str, Any]] = {}
    for what, entry in DOWNLOADS.items():
        if (described := storage.stored_file(found, entry)) is not None:
            offered[what] = described
    return offered


def _log(found: Job) -> dict[str, Any]:
    return {"events": job_store.event_tail(session.get(), found.id, _LOG_TAIL)}


@bp.get("/jobs/<job_id>/metrics.json")
@auth.signed_in
def job_metrics(job_id: str) -> Response:
    """Metric series for the job page's charts: {state, series: {name: [[step, value]]}}."""
    found = _owned(job_id)
    series: dict[str, list[list[float]]] = {}
    for point in job_store.metric_points(session.get(), found.id):
        series.setdefault(point.name, []).append([point.step, point.value])
    terminal = JobState(found.state).is_terminal
    return jsonify(state=found.state, terminal=terminal, series=series)


@bp.post("/jobs/<job_id>/cancel")
@auth.signed_in
def cancel(job_id: str) -> Response:
    db = session.get()
    job_store.request_cancel(db, _owned(job_id))
    db.commit()
    return redirect(url_for("ui.job", job_id=job_id))


@bp.get("/jobs/<job_id>/download/<what>")
@auth.signed_in
def download(job_id: str, what: str) -> Response:
    """A job's output or error file, sent as the API sends it."""
    found = _owned(job_id)
    if what not in _downloads(found):
        abort(404, f"job {job_id} has no {what} file to download")
    return storage.send_result_file(found, DOWNLOADS[what])


def _owned(job_id: str) -> Job:
    return job_store.get_owned(session.get(), job_id, auth.current().visible_owner)
