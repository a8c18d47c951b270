"""Refuse text no database column can hold: a NUL character anywhere a user names things.

PostgreSQL's text columns cannot store U+0000, so a NUL in a path id, a query argument, a
header, a form field or an upload's file name reached the database as a 500. JSON strings
are covered by kiln.safejson; this covers everything else a request carries, before use.
"""

from __future__ import annotations

from collections.abc import Iterable

from flask import Flask, request
from flask.wrappers import Request

from kiln.errors import InvalidRequest

_NUL = "\x00"


def _refuse_nul(where: str, texts: Iterable[str | None]) -> None:
    if any(text and _NUL in text for text in texts):
        raise InvalidRequest(f"the request's {where} holds a NUL character (U+0000)")


def _flat(pairs: Iterable[tuple[str, str]]) -> Iterable[str]:
    return (text for pair in pairs for text in pair)


class GuardedRequest(Request):
    """Checks form fields and upload file names when the form is first read, so a route
    (or a UI page) reads them as usual and a refused one is a 400, not a database error."""

    def _load_form_data(self) -> None:
        super()._load_form_data()
        _refuse_nul("form fields", _flat(self.form.items(multi=True)))
        _refuse_nul("file names", (f.filename for _, f in self.files.items(multi=True)))


def init_app(app: Flask) -> None:
    app.request_class = GuardedRequest

    @app.before_request
    def _refuse_nul_in_url_and_headers() -> None:
        _refuse_nul("path", (request.path,))
        _refuse_nul("query", _flat(request.args.items(multi=True)))
        _refuse_nul("headers", request.headers.values())
