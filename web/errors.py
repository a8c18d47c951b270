"""Every API error as application/problem+json with a machine-readable code."""

from __future__ import annotations

import logging
from http import HTTPStatus

from flask import Flask, Response, json, render_template, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from kiln.errors import KilnError, PayloadTooLarge, summary, validation_details
from kiln.schemas import Problem

log = logging.getLogger(__name__)


def problem(status: int, code: str, detail: str, errors: list[dict] | None = None) -> Response:
    """Build the one error body Kiln's API answers with (RFC 9457)."""
    body = Problem(
        title=_title(status), status=status, code=code, detail=detail, errors=errors or []
    )
    return Response(
        json.dumps(body.model_dump()), status=status, mimetype="application/problem+json"
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def init_app(app: Flask) -> None:
    @app.errorhandler(KilnError)
    def _kiln_error(exc: KilnError) -> Response:
        return problem(exc.status, exc.code, exc.message, exc.details)

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError) -> Response:
        details = validation_details(exc)
        return problem(422, "invalid_body", summary(details), details)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:  # Werkzeug's own body limit: the same answer as Kiln's limits
            return problem(413, PayloadTooLarge.code, _too_large_detail(app))
        if _browser_outside_the_api():  # an unknown page: the UI's page, not JSON
            return Response(
                render_template("error.html", status=status, message=exc.description),
                status=status,
            )
        code = (exc.name or "error").lower().replace(" ", "_")
        response = problem(status, code, exc.description or exc.name)
        if status == 405 and exc.get_response().allow:
            response.headers["Allow"] = ", ".join(exc.get_response().allow)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem(500, "internal_error", "an unexpected error occurred; it was logged")


def _browser_outside_the_api() -> bool:
    """A browser asking for a page (HTML first in its Accept) at an address outside
    /api/; clients that accept anything (curl's */*) still get problem+json."""
    wants = request.accept_mimetypes.best_match(["application/problem+json", "text/html"])
    return wants == "text/html" and not request.path.startswith("/api/")


def _too_large_detail(app: Flask) -> str:
    limit = app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and (request.content_length or 0) > limit:
        return f"the request body is larger than {limit} bytes"
    # Werkzeug also refuses a form with too many parts or an oversized non-file field.
    return "the request body is too large: a form field or the number of parts is over the limit"
