"""Jobs pages: the list (live, a page at a time), one job (live status, log, chart data,
webhook deliveries), cancel, delete, downloads."""

from __future__ import annotations

import json
from typing import Any

from flask import abort, flash, jsonify, redirect, render_template, request, url_for
from flask import session as flask_session
from werkzeug import Response

from db import jobs as job_store
from db import queue_estimate, registry
from db import shards as shard_store
from db.models import Job
from kiln.errors import KilnError
from kiln.specs import KINDS
from kiln.states import JobState
from kiln.tags import MAX_TAGS, parse_filter
from web import job_streams, live_workers, session, storage, webhooks
from web.auth import SESSION_KEY_ID
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


def _tag_filters() -> tuple[list[str], str]:
    """The list's tag filters: `tag` arguments (repeatable; the form's field may hold
    several separated by spaces), and what was wrong with any left out."""
    given = [text for arg in request.args.getlist("tag") for text in arg.split()]
    kept, problems = [], []
    for text in given[:MAX_TAGS]:
        try:
            parse_filter(text)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            kept.append(text)
    if len(given) > MAX_TAGS:
        problems.append(f"at most {MAX_TAGS} tag filters; the rest were left out")
    return kept, "; ".join(problems)


def _listing() -> dict[str, Any]:
    state = request.args.get("state", "")
    kind = request.args.get("kind", "")
    cursor = request.args.get("cursor") or None
    tags, tag_error = _tag_filters()
    page = job_store.listed(
        session.get(),
        auth.current().visible_owner,
        state=JobState(state) if state in _STATES else None,
        kind=kind or None,
        tags=[parse_filter(text) for text in tags],
        cursor=cursor,
        limit=_LIST_LIMIT,
    )
    return {
        "tags": tags,
        "tag_error": tag_error,
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
        **_webhooks(found),
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


@bp.get("/jobs/<job_id>/webhooks")
@auth.signed_in
def job_webhooks(job_id: str) -> str:
    """The webhook deliveries: what the job page's third htmx poll swaps in."""
    found = _owned(job_id)
    return render_template("_job_webhooks.html", job=found, **_webhooks(found))


def _webhooks(found: Job) -> dict[str, Any]:
    if found.webhook_url is None:
        return {}
    listed = webhooks.deliveries(session.get(), found.id)
    waiting = any(m.state == "pending" for m in listed.messages)
    return {
        "deliveries": listed,
        "webhooks_polling": waiting or not JobState(found.state).is_terminal,
    }


@bp.get("/jobs/<job_id>/stream")
@auth.signed_in
def job_stream(job_id: str) -> Response:
    """The job's live stream for the page's EventSource (the API's, on the session's key)."""
    found = _owned(job_id)
    caller = "ui:" + str(flask_session.get(SESSION_KEY_ID, ""))
    raw = request.headers.get("Last-Event-ID") or request.args.get("after")
    return job_streams.respond(found.id, caller, raw)


def _status(found: Job) -> dict[str, Any]:
    return {
        "terminal": JobState(found.state).is_terminal,
        "standing": queue_estimate.estimate(session.get(), found, live_workers.slots),
        "result_json": json.dumps(found.result, indent=2) if found.result else "",
        "downloads": _downloads(found),
        "export_file": _export_file(found),
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


def _export_file(found: Job) -> str | None:
    """Where a succeeded export job's file is downloaded: from its model version, which
    keeps it (None once that version or its model is gone)."""
    result = found.result or {}
    if found.kind != "export" or found.state != JobState.SUCCEEDED:
        return None
    try:
        model = registry.get_model(session.get(), found.owner, result["model"])
        version = registry.resolve_version(session.get(), model, result["version"])
    except (KilnError, KeyError):
        return None
    if result.get("format") not in version.exports:
        return None
    what = result["format"]
    return url_for("ui.download_version_file", model_id=model.id, number=version.number, what=what)


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


@bp.route("/jobs/<job_id>/delete", methods=["GET", "POST"])
@auth.signed_in
def delete(job_id: str) -> Response | tuple[str, int] | str:
    """GET asks to confirm; POST deletes as the API does: refused (409, with the reason)
    while the job is queued or running, or a live job resumes from it."""
    found = _owned(job_id)
    page = {
        "what": f"job {found.id[:8]}",
        "consequence": "Its log lines, metrics, output files and scratch are removed; a model "
        "version it trained stays.",
        "action": url_for("ui.delete", job_id=found.id),
        "back": url_for("ui.job", job_id=found.id),
    }
    if request.method == "GET":
        return render_template("confirm_delete.html", error=None, **page)
    try:
        storage.delete_job(session.get(), found)
    except KilnError as exc:  # IllegalTransition (not finished), InUse (resumed from)
        return render_template("confirm_delete.html", error=exc.message, **page), exc.status
    flash(f"Deleted {page['what']}.")
    return redirect(url_for("ui.jobs"))


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
