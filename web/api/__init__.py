"""The JSON API under /api/v1: every route needs an API key, except the OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, request

from web.auth import authenticate_request

bp = Blueprint("api", __name__, url_prefix="/api/v1")

_PUBLIC = {"api.openapi"}


@bp.before_request
def _authenticate() -> None:
    if request.endpoint not in _PUBLIC:
        authenticate_request()


from web.api import (  # noqa: E402, F401  (register routes)
    datasets,
    jobs,
    keys,
    models,
    openapi,
    schedules,
    streams,
    webhooks,
    workers,
)
