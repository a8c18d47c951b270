"""Read and answer JSON bodies through the pydantic models of kiln.schemas."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import Response, g, json, request
from pydantic import BaseModel

from kiln import safejson
from kiln.errors import InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)

#: The largest JSON body read (uploads are multipart and have their own limit): 10,000
#: predict rows of 500 features fit, and a body is parsed in memory, several times its size.
MAX_JSON_BODY_BYTES = 64 * 1024 * 1024
_CHUNK = 1024 * 1024
_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def json_body() -> Any:
    """The request's body parsed by kiln.safejson (once per request; routes and the
    idempotency fingerprint share it)."""
    if "kiln_json_body" not in g:
        if not request.is_json:
            sent = request.mimetype or "no Content-Type"
            raise InvalidRequest(
                f"the body must be JSON sent with Content-Type: application/json, not {sent}"
            )
        g.kiln_json_body = safejson.loads(_read_body(), "the body")
    return g.kiln_json_body


def _read_body() -> bytes:
    if (request.content_length or 0) > MAX_JSON_BODY_BYTES:
        raise _too_large()
    parts: list[bytes] = []
    size = 0
    while chunk := request.stream.read(_CHUNK):
        size += len(chunk)
        if size > MAX_JSON_BODY_BYTES:  # a chunked body states no length up front
            raise _too_large()
        parts.append(chunk)
    return b"".join(parts)


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge(f"a JSON body may be at most {MAX_JSON_BODY_BYTES} bytes")


def parse(model: type[M]) -> M:
    """The request's JSON body as `model`; 400 when it is not a JSON object."""
    raw = json_body()
    if not isinstance(raw, dict):
        kind = _TYPE_NAMES.get(type(raw), "null" if raw is None else "a number")
        raise InvalidRequest(f"the body must be a JSON object, not {kind}")
    return model.model_validate(raw)


def answer(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body.model_dump(mode="json")),
        status=status,
        headers=headers,
        mimetype="application/json",
    )
