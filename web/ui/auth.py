"""Who is signed in: the session names an API key, re-checked on every request."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

from flask import g, redirect, request, session, url_for

from db import keys
from db.models import ApiKey
from web import session as db_session
from web.auth import SESSION_KEY_ID, Principal

P = ParamSpec("P")
R = TypeVar("R")


def sign_in(plaintext: str) -> bool:
    """Start a session for the key, if it is live; False leaves the session signed out."""
    db = db_session.get()
    key = keys.authenticate(db, plaintext.strip())
    if key is None:
        return False
    db.commit()  # last_used_at
    session.clear()  # a fresh session (and CSRF token) for the new identity
    session[SESSION_KEY_ID] = key.id
    session.permanent = False
    return True


def sign_out() -> None:
    session.clear()


def load_principal() -> None:
    """before_request: g.principal from the session's key, unless it was revoked since."""
    g.principal = None
    key_id = session.get(SESSION_KEY_ID)
    if key_id is None:
        return
    key = db_session.get().get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        session.pop(SESSION_KEY_ID, None)
        return
    g.principal = Principal(owner=key.owner, role=key.role)


def current() -> Principal:
    principal: Principal = g.principal
    return principal


def signed_in(view: Callable[P, R]) -> Callable[P, R]:
    """Send a visitor who is not signed in to the sign-in page, then back."""

    @wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if g.get("principal") is None:
            # A redirect answers in place of any view's own return type R.
            return redirect(url_for("ui.signin", next=request.full_path.rstrip("?")))  # type: ignore[return-value]
        return view(*args, **kwargs)

    return wrapper


def safe_next(target: str | None) -> str:
    """Only a path on this site, so the sign-in form is no open redirect."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and "\\" not in target:
            return target
    return url_for("ui.jobs")
