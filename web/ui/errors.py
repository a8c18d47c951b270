"""Errors on UI pages answer as HTML pages, not the API's problem+json."""

from __future__ import annotations

import logging

from flask import render_template
from werkzeug.exceptions import HTTPException

from kiln.errors import KilnError
from web.ui import bp

log = logging.getLogger(__name__)


@bp.errorhandler(KilnError)
def _kiln_error(exc: KilnError) -> tuple[str, int]:
    return render_template("error.html", status=exc.status, message=exc.message), exc.status


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    return render_template("error.html", status=status, message=exc.description), status


@bp.errorhandler(Exception)
def _unexpected(exc: Exception) -> tuple[str, int]:
    log.exception("unhandled error on a UI page")
    return render_template("error.html", status=500, message="An unexpected error occurred."), 500
