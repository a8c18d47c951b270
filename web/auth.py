"""Bearer API keys: who is calling, and the owner rules every route applies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import ParamSpec, TypeVar

from flask import g, request

from db import keys
from kiln.errors import Forbidden, Unauthorized
from web import session

#: The field of the UI's signed session cookie that names the signed-in API key's id
#: (web.ui.auth writes it; web.limits counts a signed-in browser by it).
SESSION_KEY_ID = "api_key_id"

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Principal:
    owner: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def visible_owner(self) -> str | None:
        """The owner whose objects this caller may see; None means all (an admin)."""
        return None if self.is_admin else self.owner


def authenticate_request() -> None:
    """before_request hook: resolve the Bearer key into g.principal, or answer 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    db = session.get()
    key = keys.authenticate(db, token.strip())
    if key is None:
        raise Unauthorized("the API key is unknown or revoked")
    db.commit()  # last_used_at
    g.principal = Principal(owner=key.owner, role=key.role)


def principal() -> Principal:
    return g.principal


def require_admin(view: Callable[P, R]) -> Callable[P, R]:
    @wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not principal().is_admin:
            raise Forbidden("this needs an admin API key")
        return view(*args, **kwargs)

    return wrapper
