"""GET /api/v1/openapi.json, generated from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kiln import schemas
from kiln.families import FAMILIES, HF_TASKS
from kiln.specs import KINDS
from web.api import bp

_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(model)}}}


def _op(
    summary: str,
    ok: int,
    out: type[BaseModel],
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            str(ok): {"description": "OK", **_json(out)},
            "default": {
                "description": "An error (RFC 9457 problem details)",
                "content": {"application/problem+json": {"schema": _ref(schemas.Problem)}},
            },
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": body}
    if params:
        operation["parameters"] = params
    return operation


def _problem() -> dict[str, Any]:
    return {
        "description": "An error (RFC 9457 problem details)",
        "content": {"application/problem+json": {"schema": _ref(schemas.Problem)}},
    }


def _file_op(summary: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    """An operation that answers a file download."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "summary": summary,
        "parameters": params,
        "responses": {
            "200": {"description": "The file", "content": {"application/octet-stream": binary}},
            "default": _problem(),
        },
    }


def _stream_op(params: list[dict[str, Any]]) -> dict[str, Any]:
    """GET /jobs/<id>/stream: Server-Sent Events (docs/architecture.md, "Live streams")."""
    resume = {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "The id of the last event received: the stream resumes after it.",
        "schema": {"type": "string"},
    }
    after = {**_query("after"), "description": "Like Last-Event-ID, or a log line id."}
    events = {"schema": {"type": "string"}}
    return {
        "summary": "A job's state, progress, metric points and log lines as Server-Sent "
        "Events (event: state | progress | metric | log; data: JSON), until it ends",
        "parameters": [*params, resume, after],
        "responses": {
            "200": {"description": "The event stream", "content": {"text/event-stream": events}},
            "default": _problem(),
        },
    }


def _no_content_op(summary: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": params,
        "responses": {"204": {"description": "Deleted"}, "default": _problem()},
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}


def _idempotency_key() -> dict[str, Any]:
    return {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Retry-safe submission: the same key and body return the same job; "
        "the same key with another body is 422, and a retry while the first is in flight 409.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    }


def _paths() -> dict[str, Any]:
    job = [_path("job_id")]
    schedule = [_path("schedule_id")]
    submission = {"application/json": {"schema": _ref(schemas.JobSubmission)}}
    upload = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "name": {"type": "string"},
                },
            }
        }
    }
    model_upload = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "description": "A zoo or plugin model: `weights` and `config` (family=plugin "
                "is implied by a plugin's arch). A Hugging Face model "
                "directory (docs/models.md): family=hf, `task` and `files`, one part per file "
                "(repeat the part) or one .tar/.tar.gz.",
                "properties": {
                    "weights": {"type": "string", "format": "binary"},
                    "config": _ref(schemas.ModelConfigIn),
                    "family": {"type": "string", "enum": list(FAMILIES), "default": "zoo"},
                    "task": {"type": "string", "enum": list(HF_TASKS)},
                    "files": {"type": "string", "format": "binary"},
                },
            },
            "encoding": {"config": {"contentType": "application/json"}},
        }
    }
    tag_filter = {
        "name": "tag",
        "in": "query",
        "required": False,
        "description": "key:value (or key alone: any value); repeat it, and a job must carry "
        "every tag given.",
        "schema": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
        "style": "form",
        "explode": True,
    }
    listing = [
        _query("state"),
        _query("kind"),
        tag_filter,
        _query("cursor"),
        _query("limit", "integer"),
    ]
    # Shards of sharded batch jobs are listed only when asked for.
    listing += [_query("parent"), _query("include_shards", "boolean")]
    return {
        "/api/v1/jobs": {
            "post": _op("Submit a job", 202, schemas.JobOut, submission, [_idempotency_key()]),
            "get": _op("List jobs, newest first", 200, schemas.JobPage, params=listing),
        },
        "/api/v1/jobs/{job_id}": {
            "get": _op("Read a job", 200, schemas.JobOut, params=job),
            "delete": _no_content_op(
                "Delete a finished job with its log lines, metrics and files (409 "
                "illegal_transition while queued or running, in_use while a job resumes "
                "from it)",
                job,
            ),
        },
        "/api/v1/jobs/{job_id}/cancel": {
            "post": _op("Cancel a job", 202, schemas.JobOut, params=job)
        },
        "/api/v1/jobs/{job_id}/metrics": {
            "get": _op("A job's metric series", 200, schemas.MetricSeries, params=job)
        },
        "/api/v1/jobs/{job_id}/events": {
            "get": _op(
                "A job's log lines",
                200,
                schemas.EventPage,
                params=[*job, _query("after", "integer"), _query("limit", "integer")],
            )
        },
        "/api/v1/jobs/{job_id}/deliveries": {
            "get": _op(
                "A job's webhook messages and every delivery attempt",
                200,
                schemas.DeliveryList,
                params=job,
            )
        },
        "/api/v1/webhooks/secret": {
            "get": _op("Your webhook signing secret", 200, schemas.WebhookSecretOut)
        },
        "/api/v1/webhooks/secret/rotate": {
            "post": _op(
                "Rotate your webhook signing secret (the old one signs too for a grace period)",
                200,
                schemas.WebhookSecretOut,
            )
        },
        "/api/v1/jobs/{job_id}/stream": {"get": _stream_op(job)},
        "/api/v1/jobs/{job_id}/output": {
            "get": _file_op("A job's output file (batch_predict predictions)", job)
        },
        "/api/v1/jobs/{job_id}/errors": {
            "get": _file_op("A job's error file (JSONL: row, reason)", job)
        },
        "/api/v1/schedules": {
            "post": _op(
                "Create a cron schedule of a job template",
                201,
                schemas.ScheduleOut,
                {"application/json": {"schema": _ref(schemas.ScheduleRequest)}},
            ),
            "get": _op("List schedules", 200, schemas.ScheduleList),
        },
        "/api/v1/schedules/{schedule_id}": {
            "get": _op("Read a schedule", 200, schemas.ScheduleOut, params=schedule),
            "delete": {**_op("Delete a schedule", 204, schemas.ScheduleOut, params=schedule)},
        },
        "/api/v1/schedules/{schedule_id}/pause": {
            "post": _op("Pause a schedule", 200, schemas.ScheduleOut, params=schedule)
        },
        "/api/v1/schedules/{schedule_id}/resume": {
            "post": _op("Resume a schedule", 200, schemas.ScheduleOut, params=schedule)
        },
        "/api/v1/models": {"get": _op("List models", 200, schemas.ModelList)},
        "/api/v1/models/{name}": {
            "get": _op("Read a model", 200, schemas.ModelOut, params=[_path("name")]),
            "delete": _no_content_op(
                "Delete a model and its versions (409 in_use while an alias points at one "
                "or a queued or running job names the model)",
                [_path("name")],
            ),
        },
        "/api/v1/models/{name}/versions/{version}": {
            "get": _op(
                "Read a model version (number, alias or latest)",
                200,
                schemas.ModelVersionOut,
                params=[_path("name"), _path("version")],
            ),
            "delete": _no_content_op(
                "Delete a version (409 in_use while an alias points at it)",
                [_path("name"), _path("version")],
            ),
        },
        "/api/v1/models/{name}/versions": {
            "post": _op(
                "Upload an externally trained model: safetensors weights plus a JSON config, "
                "or (family=hf) a Hugging Face model directory",
                201,
                schemas.ModelVersionOut,
                model_upload,
                params=[_path("name")],
            )
        },
        "/api/v1/models/{name}/versions/{version}/weights": {
            "get": _file_op(
                "Download a version's weights (safetensors)", [_path("name"), _path("version")]
            )
        },
        "/api/v1/models/{name}/versions/{version}/export": {
            "get": _file_op(
                "Download a version's export made by an export job "
                "(404 export_missing until one has run)",
                [_path("name"), _path("version"), _query("format")],
            )
        },
        "/api/v1/models/{name}/aliases/{alias}": {
            "put": _op(
                "Create or move an alias to a version",
                200,
                schemas.ModelOut,
                {"application/json": {"schema": _ref(schemas.AliasRequest)}},
                params=[_path("name"), _path("alias")],
            ),
            "delete": _op(
                "Delete an alias", 200, schemas.ModelOut, params=[_path("name"), _path("alias")]
            ),
        },
        "/api/v1/datasets": {
            "post": _op("Upload a dataset", 201, schemas.DatasetOut, upload),
            "get": _op("List datasets", 200, schemas.DatasetList),
        },
        "/api/v1/datasets/{dataset_id}": {
            "get": _op("Read a dataset", 200, schemas.DatasetOut, params=[_path("dataset_id")]),
            "delete": _no_content_op(
                "Delete a dataset (409 in_use while a model version was trained on it)",
                [_path("dataset_id")],
            ),
        },
        "/api/v1/keys": {
            "post": _op(
                "Create an API key (admin)",
                201,
                schemas.NewKeyOut,
                {"application/json": {"schema": _ref(schemas.KeyRequest)}},
            ),
            "get": _op("List API keys (admin)", 200, schemas.KeyList),
        },
        "/api/v1/workers": {
            "get": _op(
                "The live workers: host, devices, queues, current job, last heartbeat (admin)",
                200,
                schemas.WorkerList,
            )
        },
        "/api/v1/keys/{key_id}": {
            "delete": _op(
                "Revoke an API key (admin)", 200, schemas.KeyOut, params=[_path("key_id")]
            )
        },
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    models: list[type[BaseModel]] = [
        *(
            getattr(schemas, name)
            for name in schemas.__dict__
            if isinstance(getattr(schemas, name), type)
            and issubclass(getattr(schemas, name), BaseModel)
            and getattr(schemas, name).__module__ == schemas.__name__
        ),
        *KINDS.values(),
    ]
    _, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template=_REF.replace("{model}", "{model}")
    )
    components = defs.get("$defs", {})
    components["JobSubmission"]["properties"]["kind"]["enum"] = sorted(KINDS)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": "1", "description": _DESCRIPTION},
        "paths": _paths(),
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
    }


_DESCRIPTION = (
    "Kiln's job API. A job's `spec` is validated by its kind's schema: "
    + ", ".join(f"`{kind}` → {spec.__name__}" for kind, spec in KINDS.items())
    + "."
)


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return document()
