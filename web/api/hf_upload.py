"""Register a Hugging Face model directory (`family=hf`) as a new model version.

The files come as several multipart `files` parts, or as one .tar/.tar.gz part, with form
fields `family=hf` and `task`. kiln/hfdir.py checks the whole directory before anything is
stored (a refused upload leaves nothing in the artifact store); the accepted files are then
stored as one tar, the version's single artifact, which workers unpack into a local cache.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from flask import Response, current_app, request

from db import registry
from db.models import ModelVersion
from kiln import hfdir, plugins
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
    """The form's `family` ("" when not sent); 400 for one Kiln does not know."""
    family = request.form.get("family", "")
    if family and family not in ACCEPTED_FAMILIES:
        raise InvalidRequest(f"family must be one of {', '.join(ACCEPTED_FAMILIES)}")
    return family


def weights_family(requested: str, arch: str) -> str:
    """The family of an uploaded safetensors file and config: plugin when `arch` is an
    installed plugin's, else zoo; 400 when the form asked for the other one."""
    family = plugins.family_of(arch)
    if requested and requested != family:
        raise InvalidRequest(
            f"arch {arch!r} is a {family} architecture, not {requested} "
            f"({plugins.describe_installed()})"
        )
    return family


def stored_config(config: dict[str, Any], family: str) -> dict[str, Any]:
    """An uploaded config as stored: a plugin version notes the plugin as this web has it
    (what the upload said about it, if anything, is not evidence)."""
    config.pop("plugin", None)
    if family == "plugin":
        config["plugin"] = plugins.version_note(config["arch"])
    return config


def upload_hf_version(name: str) -> Response:
    version = register_directory(name)
    location = f"/api/v1/models/{name}/versions/{version.number}"
    return answer(ModelVersionOut.model_validate(version), 201, {"Location": location})


def register_directory(name: str) -> ModelVersion:
    """Check and register the directory this request carries (form fields `task` and
    `files`), as the signed-in principal: the API's upload, and the models page's form."""
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
        tokenizer = _tokenizer(checked)
    summary = checked.summary
    db = session.get()
    version = registry.register_version(
        db,
        owner=principal().owner,
        name=name,
        source_job_id=None,
        arch=summary["model_type"][:32],
        config={
            "hf": summary,
            "label_names": summary["label_names"],
            # What the model page shows, read here: the web never loads transformers.
            "tokenizer": tokenizer,
            "context_length": _context_length(summary["context_length"], tokenizer),
        },
        metrics={},
        artifact_digest=stored.digest,
        artifact_size=stored.size,
        dataset_digest=None,
        lineage={"origin": "upload", "files": sorted(summary["files"])},
        family="hf",
        task=task,
    )
    db.commit()
    return version


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


#: Files that make up a tokenizer (besides sentencepiece's *.model).
_TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
}
#: tokenizer_config.json's model_max_length when a tokenizer sets no limit (a huge number).
_NO_LIMIT = 1_000_000


def _tokenizer(checked: hfdir.Checked) -> dict[str, Any]:
    """The tokenizer's class (from tokenizer_config.json), files and maximum length."""
    files = sorted(
        e.name for e in checked.entries if e.name in _TOKENIZER_FILES or e.name.endswith(".model")
    )
    settings: dict[str, Any] = {}
    for entry in checked.entries:
        if entry.name == "tokenizer_config.json":  # already checked to be a JSON object
            with entry.open() as handle:
                settings = json.loads(handle.read())
    name, limit = settings.get("tokenizer_class"), settings.get("model_max_length")
    return {
        "class": name if isinstance(name, str) else None,
        "files": files,
        "model_max_length": limit if type(limit) is int and 0 < limit < _NO_LIMIT else None,
    }


def _context_length(positions: int | None, tokenizer: dict[str, Any]) -> int | None:
    """What a worker will take: the smaller of the position embeddings and the tokenizer's
    model_max_length (workers/ml/hf.py applies the same rule)."""
    known = [n for n in (positions, tokenizer["model_max_length"]) if n is not None]
    return min(known) if known else None
