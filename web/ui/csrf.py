"""CSRF: a random token per session, required on every state-changing UI request."""

from __future__ import annotations

import hmac
import secrets

from flask import abort, request, session

_FIELD = "csrf_token"
#: htmx and the upload script send the token in this header instead of a form field.
_HEADER = "X-CSRF-Token"


def token() -> str:
    """The session's token, created on first use (templates call it as csrf_token())."""
    if _FIELD not in session:
        session[_FIELD] = secrets.token_urlsafe(32)
    return str(session[_FIELD])


def protect() -> None:
    """before_request: refuse a POST whose token is missing or not this session's (403)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    expected = session.get(_FIELD)
    sent = request.form.get(_FIELD) or request.headers.get(_HEADER, "")
    if not expected or not hmac.compare_digest(str(expected), sent):
        abort(403, "the form's security token is missing or stale; reload the page and retry")
