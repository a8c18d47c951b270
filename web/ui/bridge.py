"""Serve an API route to a signed-in browser: same view, same checks, session identity.

Download links (a batch job's output, its error rows) point here rather than at /api/v1,
which a browser cannot call without an Authorization header. The API view runs unchanged,
with the session's principal in place of the Bearer key's.
"""

from __future__ import annotations

import re
from typing import Any

from flask import current_app

from web.ui import auth

#: What a job page may offer for download, by the shape of the API route that serves it
#: (its one path variable, the job id, may have any name).
DOWNLOADS = {
    "output": "/api/v1/jobs/<>/output",
    "errors": "/api/v1/jobs/<>/errors",
}


def _shape(rule: str) -> str:
    return re.sub(r"<[^>]*>", "<>", rule)


def route_for(what: str) -> tuple[str, str] | None:
    """(endpoint, name of its job-id argument) of the API route serving `what`, if any."""
    shape = DOWNLOADS.get(what)
    for rule in current_app.url_map.iter_rules():
        if _shape(rule.rule) == shape and len(rule.arguments) == 1 and "GET" in rule.methods:
            return rule.endpoint, next(iter(rule.arguments))
    return None


def available_downloads() -> list[str]:
    return [what for what in DOWNLOADS if route_for(what) is not None]


def call(endpoint: str, **kwargs: Any) -> Any:
    """Run an API view for the signed-in user (the caller has checked they are signed in)."""
    assert auth.current() is not None  # g.principal is what the API views read
    return current_app.view_functions[endpoint](**kwargs)
