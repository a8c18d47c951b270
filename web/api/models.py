"""The model registry: models, versions, aliases, uploads, and downloads of stored files."""

from __future__ import annotations

from flask import Response, current_app, request
from pydantic import ValidationError

from db import registry
from db.models import Model, ModelVersion
from kiln import modelfile, safejson
from kiln.artifacts import ArtifactStore, open_store
from kiln.errors import (
    InvalidModelFile,
    InvalidRequest,
    PayloadTooLarge,
    summary,
    validation_details,
)
from kiln.schemas import AliasRequest, ModelConfigIn, ModelList, ModelOut, ModelVersionOut
from kiln.settings import Settings
from kiln.specs import check_model_name
from web import session, storage
from web.api import bp, hf_upload
from web.api.body import MAX_JSON_BODY_BYTES, answer, parse
from web.auth import principal

#: Float weights, and int64 for BatchNorm's num_batches_tracked counter (cnn, plugins).
_WEIGHT_DTYPES = {**modelfile.FLOAT_DTYPES, "I64": 8}


@bp.get("/models")
def list_models() -> Response:
    found = registry.listed(session.get(), principal().visible_owner)
    return answer(ModelList(models=[ModelOut.model_validate(m) for m in found]))


@bp.get("/models/<name>")
def get_model(name: str) -> Response:
    return answer(ModelOut.model_validate(_model(name)))


@bp.delete("/models/<name>")
def delete_model(name: str) -> Response:
    """Delete a model, its versions and the files only they used: 409 in_use while an alias
    points at a version or a queued or running job names the model."""
    storage.delete_model(session.get(), _model(name))
    return Response(status=204)


@bp.get("/models/<name>/versions/<version>")
def get_version(name: str, version: str) -> Response:
    return answer(ModelVersionOut.model_validate(_version(name, version)))


@bp.post("/models/<name>/versions")
def upload_version(name: str) -> Response:
    """Register an externally trained model: safetensors weights plus a JSON config, or
    (form field family=hf) a Hugging Face model directory."""
    family = hf_upload.requested_family()
    if family == "hf":
        return hf_upload.upload_hf_version(name)
    _check_name(name)
    weights = request.files.get("weights")
    if weights is None:
        raise InvalidRequest("send the weights as multipart/form-data field 'weights'")
    config = _upload_config()
    family = hf_upload.weights_family(family, config.arch)
    # The header is read and checked before anything is stored, so a refused file (a
    # pickle, say) never reaches the artifact store.
    prefix, header = modelfile.read_header(weights.stream.read, _WEIGHT_DTYPES)
    _check_fits(header, config)
    limit = _settings().max_upload_bytes
    if header.file_size > limit:
        raise PayloadTooLarge(f"the file is larger than {limit} bytes")
    stored = _store().put_chunks(
        modelfile.exact_chunks(prefix, weights.stream, header.file_size), max_bytes=limit
    )
    db = session.get()
    version = registry.register_version(
        db,
        owner=principal().owner,
        name=name,
        source_job_id=None,
        arch=config.arch,
        config=hf_upload.stored_config(config.model_dump(exclude_none=True), family),
        metrics={},
        artifact_digest=stored.digest,
        artifact_size=stored.size,
        dataset_digest=None,
        lineage={"origin": "upload", "filename": weights.filename or ""},
        family=family,
    )
    db.commit()
    location = f"/api/v1/models/{name}/versions/{version.number}"
    return answer(ModelVersionOut.model_validate(version), 201, {"Location": location})


@bp.delete("/models/<name>/versions/<version>")
def delete_version(name: str, version: str) -> Response:
    """Delete a version (409 while an alias points at it) and the files only it used."""
    storage.delete_version(session.get(), _model(name), version)
    return Response(status=204)


@bp.put("/models/<name>/aliases/<alias>")
def set_alias(name: str, alias: str) -> Response:
    """Create or move an alias (production, staging, any name) to a version number."""
    model = _model(name)  # an unknown (or another owner's) model is 404 before the body
    body = parse(AliasRequest)
    db = session.get()
    model = registry.set_alias(db, model, alias, body.version)
    db.commit()
    return answer(ModelOut.model_validate(model))


@bp.delete("/models/<name>/aliases/<alias>")
def delete_alias(name: str, alias: str) -> Response:
    db = session.get()
    model = registry.remove_alias(db, _model(name), alias)
    db.commit()
    return answer(ModelOut.model_validate(model))


@bp.get("/models/<name>/versions/<version>/weights")
def download_weights(name: str, version: str) -> Response:
    """The version's safetensors file, streamed from the artifact store."""
    return storage.send_version_file(name, _version(name, version), "weights")


@bp.get("/models/<name>/versions/<version>/export")
def download_export(name: str, version: str) -> Response:
    """An export made by an `export` job; 404 export_missing until one has run."""
    fmt = request.args.get("format", "torchscript")
    if fmt != "torchscript":
        raise InvalidRequest("format must be 'torchscript'")
    return storage.send_version_file(name, _version(name, version), fmt)


def _upload_config() -> ModelConfigIn:
    """The config, from form field 'config' (JSON text) or a file part of that name."""
    part = request.files.get("config")
    raw = part.read(MAX_JSON_BODY_BYTES + 1) if part is not None else request.form.get("config")
    if not raw:
        raise InvalidRequest("send the model config as multipart/form-data field 'config'")
    if len(raw) > MAX_JSON_BODY_BYTES:
        raise PayloadTooLarge(f"config may be at most {MAX_JSON_BODY_BYTES} bytes")
    parsed = safejson.loads(raw, "config", ("config",))
    try:
        return ModelConfigIn.model_validate(parsed)
    except ValidationError as exc:
        details = validation_details(exc, ("config",))
        raise InvalidRequest(summary(details), details) from None


def _check_fits(header: modelfile.Header, config: ModelConfigIn) -> None:
    """What the web can check without building the network: the normalisation buffers, when
    present, match the feature count. Layer shapes are checked when a worker loads it."""
    width = len(config.feature_names)
    for buffer in ("mean", "std"):
        shape = header.shapes.get(buffer)
        if shape is not None and shape != [width]:
            raise InvalidModelFile(
                f"tensor {buffer!r} has shape {shape}; the config names {width} features"
            )


def _check_name(name: str) -> None:
    try:
        check_model_name(name)
    except ValueError as exc:
        raise InvalidRequest(f"model name {exc}") from None


def _model(name: str) -> Model:
    # A user's names are their own; an admin asking by name sees their own namespace too.
    return registry.get_model(session.get(), principal().owner, name)


def _version(name: str, ref: str) -> ModelVersion:
    return registry.find_version(session.get(), principal().owner, name, ref)


def _settings() -> Settings:
    return current_app.config["KILN_SETTINGS"]


def _store() -> ArtifactStore:
    return open_store(_settings())
