"""Register a Hugging Face model directory (`family=hf`) as a new model version.

The files come as several multipart `files` parts, or as one .tar/.tar.gz part, with form
fields `family=hf` and `task`. kiln/hfdir.py checks the whole directory before anything is
stored (a refused upload leaves nothing in the artifact store); the accepted files are then
stored as one tar, the version's single artifact, which workers unpack into a local cache.
"""

from __future__ import annotations

import contextlib

from flask import Response, current_app, request

from db import registry
from kiln import hfdir
from kiln.artifacts import open_store
from kiln.errors import InvalidRequest
from kiln.families import ACCEPTED_FAMILIES, HF_TASKS
from kiln.schemas import ModelVersionOut
from kiln.settings import Settings
from kiln.specs import check_model_name
from web import session
from web.api.body import answer
from web.auth import principal


def requested_family() -> str:
    """The form's `family` (default zoo); 400 for one Kiln does not accept (yet)."""
    family = request.form.get("family", "zoo")
    if family not in ACCEPTED_FAMILIES:
        raise InvalidRequest(
            f"family must be one of {', '.join(ACCEPTED_FAMILIES)} (plugin models are not "
            "accepted yet)"
        )
    return family


def upload_hf_version(name: str) -> Response:
    try:
        check_model_name(name)
    except ValueError as exc:
        raise InvalidRequest(f"model name {exc}") from None
    task = request.form.get("task")
    if task not in HF_TASKS:
        raise InvalidRequest(f"form field 'task' must be one of {', '.join(HF_TASKS)}")
    settings: Settings = current_app.config["KILN_SETTINGS"]
    limit = settings.max_upload_bytes
    with contextlib.ExitStack() as cleanup:
        checked = hfdir.check(_entries(limit, cleanup), limit)
        stored = open_store(settings).put_chunks(hfdir.tar_chunks(checked), max_bytes=None)
    summary = checked.summary
    db = session.get()
    version = registry.register_version(
        db,
        owner=principal().owner,
        name=name,
        source_job_id=None,
        arch=summary["model_type"][:32],
        config={"hf": summary, "label_names": summary["label_names"]},
        metrics={},
        artifact_digest=stored.digest,
        artifact_size=stored.size,
        dataset_digest=None,
        lineage={"origin": "upload", "files": sorted(summary["files"])},
        family="hf",
        task=task,
    )
    db.commit()
    location = f"/api/v1/models/{name}/versions/{version.number}"
    return answer(ModelVersionOut.model_validate(version), 201, {"Location": location})


def _entries(limit: int, cleanup: contextlib.ExitStack) -> list[hfdir.Entry]:
    parts = request.files.getlist("files")
    if not parts:
        raise InvalidRequest(
            "send the model directory's files as multipart/form-data parts named 'files' "
            "(or one .tar/.tar.gz part)"
        )
    if len(parts) == 1 and hfdir.is_tar_upload(parts[0].filename or ""):
        return cleanup.enter_context(hfdir.entries_from_tar(parts[0].stream, limit))
    return [hfdir.entry_from_stream(p.filename or "", p.stream) for p in parts]
