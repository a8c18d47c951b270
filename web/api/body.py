"""Read and answer JSON bodies through the pydantic models of kiln.schemas."""

from __future__ import annotations

from typing import TypeVar

from flask import Response, json, request
from pydantic import BaseModel

from kiln.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


def parse(model: type[M]) -> M:
    """The request's JSON body as `model`; 400 when it is not a JSON object."""
    raw = request.get_json(silent=True)
    if not isinstance(raw, dict):
        raise InvalidRequest("the body must be a JSON object (Content-Type: application/json)")
    return model.model_validate(raw)


def answer(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body.model_dump(mode="json")),
        status=status,
        headers=headers,
        mimetype="application/json",
    )
