"""Security headers on every response; a page that sets its own (the UI's CSP) keeps them."""

from __future__ import annotations

from flask import Flask, Response, request

#: Every response: no MIME sniffing, no referrer leaks.
_ALL = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: API responses are data, never pages: nothing may render, frame or cache them.
_API = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
#: Retry-After means "try again later" (RFC 9110): only these answers carry it.
_RETRY_STATUSES = frozenset({429, 503})


def init_app(app: Flask) -> None:
    def _security_headers(response: Response) -> Response:
        for name, value in _ALL.items():
            response.headers.setdefault(name, value)
        if request.path.startswith("/api/"):
            for name, value in _API.items():
                response.headers.setdefault(name, value)
        if response.status_code not in _RETRY_STATUSES:
            # Flask-Limiter adds Retry-After (the window's reset) to every limited answer.
            response.headers.pop("Retry-After", None)
        return response

    # Flask runs after_request hooks last-registered first: this one goes first in the
    # list so it runs after every other hook (the limiter's included), whatever the order
    # of init_app calls.
    app.after_request_funcs.setdefault(None, []).insert(0, _security_headers)
