"""Liveness and readiness probes, outside the authenticated API."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import text

from web import dispatch, session

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (no dependency is checked)."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[dict[str, object], int]:
    """Ready when the database and the broker both answer."""
    checks = {"database": _database_ok(), "broker": dispatch.broker_reachable()}
    ready = all(checks.values())
    return {"status": "ready" if ready else "unavailable", "checks": checks}, (
        200 if ready else 503
    )


def _database_ok() -> bool:
    try:
        with session.engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        return False
    return True
