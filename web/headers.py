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


def init_app(app: Flask) -> None:
    @app.after_request
    def _security_headers(response: Response) -> Response:
        for name, value in _ALL.items():
            response.headers.setdefault(name, value)
        if request.path.startswith("/api/"):
            for name, value in _API.items():
                response.headers.setdefault(name, value)
        return response
