"""Rate limits per API key (Flask-Limiter) on the API and the UI, and the per-owner quota
of queued jobs, answered as 429 with Retry-After: problem+json on the API, a readable page
on the UI."""

from __future__ import annotations

import hashlib
import math
import time

from flask import Blueprint, Flask, Response, current_app, render_template, request, session
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded

from kiln.errors import QueueQuotaExceeded
from kiln.settings import Settings
from web.auth import SESSION_KEY_ID
from web.errors import problem

# The queue quota itself is db.submission's rule (schedules obey it too); QueueQuotaExceeded
# is imported here to answer it, and the UI's forms import it from here.

#: What a client over its queue quota is told to wait: jobs finish on their own time.
_QUOTA_RETRY_AFTER_S = 30


def storage_uri(settings: Settings) -> str:
    """Counters live in Redis when Kiln has one (shared by every web process), else memory."""
    url = settings.redis_url
    if url.startswith("redis+socket://"):  # kombu's name for the embedded Redis socket
        return "redis+unix://" + url.removeprefix("redis+socket://")
    return url if url.startswith(("redis://", "rediss://")) else "memory://"


def _caller() -> str:
    """Who a limit counts: the API key (by digest, never in clear); on the UI, the key
    its signed session names (by id); else the address."""
    header = request.headers.get("Authorization", "")
    token = header.partition(" ")[2].strip()
    if token:
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    signed_in = session.get(SESSION_KEY_ID)  # the cookie is signed: a client cannot pick it
    if signed_in:
        return f"session-key:{signed_in}"
    return "addr:" + (request.remote_addr or "unknown")


def init_app(app: Flask, settings: Settings, *limited: Blueprint) -> None:
    """Rate-limit every route of each blueprint in `limited` (the API and the UI; passed
    in, so this module imports no views) with the same limit, and answer both limits as
    429."""
    if settings.rate_limit:
        limiter = Limiter(
            _caller,
            app=app,
            storage_uri=storage_uri(settings),
            key_prefix="kiln-limits",
            headers_enabled=True,
            # A Redis outage must not take the API down with it: count in memory meanwhile.
            swallow_errors=True,
            in_memory_fallback_enabled=True,
        )
        for blueprint in limited:
            limiter.limit(settings.rate_limit)(blueprint)
        app.extensions["kiln.limiter"] = limiter

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(exc: RateLimitExceeded) -> Response:
        retry_after = _seconds_to_reset()
        if request.blueprint == "ui":  # a person at a browser: a page, not JSON
            message = (
                f"Too many requests ({exc.description}). "
                f"Wait {retry_after} s, then try again; nothing was submitted."
            )
            page = render_template("error.html", status=429, message=message)
            response = Response(page, 429, mimetype="text/html")
        else:
            response = problem(429, "rate_limited", f"rate limit exceeded ({exc.description})")
        response.headers["Retry-After"] = str(retry_after)
        return response

    @app.errorhandler(QueueQuotaExceeded)
    def _over_quota(exc: QueueQuotaExceeded) -> Response:
        response = problem(exc.status, exc.code, exc.message)
        response.headers["Retry-After"] = str(_QUOTA_RETRY_AFTER_S)
        return response


def _seconds_to_reset() -> int:
    limiter: Limiter | None = current_app.extensions.get("kiln.limiter")
    current = limiter.current_limit if limiter is not None else None
    if current is None:
        return 1
    return max(1, math.ceil(current.reset_at - time.time()))
