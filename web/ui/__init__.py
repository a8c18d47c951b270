"""The browser UI: server-rendered pages on the same data layer and owner rules as the API."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, g, request

from kiln.settings import Settings
from web.secret import secret_key
from web.ui import auth, csrf

bp = Blueprint("ui", __name__)
bp.before_request(csrf.protect)
bp.before_request(auth.load_principal)


@bp.context_processor
def _globals() -> dict[str, object]:
    return {"csrf_token": csrf.token, "principal": g.get("principal")}


#: Scripts, styles and images only from this origin; nothing may frame the pages.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def init_app(app: Flask, settings: Settings) -> None:
    app.config["SECRET_KEY"] = secret_key(settings)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")
    app.after_request(_security_headers)
    app.register_blueprint(bp)


def _security_headers(response: Response) -> Response:
    """The pages' CSP and framing rule; web.headers adds nosniff and Referrer-Policy to
    every response (this one included), and the JSON API's own headers to the API's."""
    if request.path.startswith("/api/"):
        return response
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Frame-Options", "DENY")
    return response


from web.ui import (  # noqa: E402, F401  (register routes)
    datasets,
    errors,
    filters,
    forms_views,
    jobs,
    models,
    schedules,
    signin,
)
