"""Webhook secrets: read the caller's signing secret, rotate it (docs/webhooks.md)."""

from __future__ import annotations

from datetime import timedelta

from flask import Response, current_app

from db import webhooks
from db.base import utcnow
from db.models import WebhookSecret
from kiln.schemas import WebhookSecretOut
from kiln.settings import Settings
from web import session
from web.api import bp
from web.api.body import answer
from web.auth import principal


@bp.get("/webhooks/secret")
def webhook_secret() -> Response:
    """The caller's signing secret (created the first time it is asked for or needed)."""
    db = session.get()
    row = webhooks.secret_of(db, principal().owner)
    db.commit()
    return answer(_out(row))


@bp.post("/webhooks/secret/rotate")
def rotate_webhook_secret() -> Response:
    """A new secret; the old one keeps signing beside it for KILN_WEBHOOK_SECRET_GRACE_S."""
    settings: Settings = current_app.config["KILN_SETTINGS"]
    db = session.get()
    grace = timedelta(seconds=settings.webhook_secret_grace_s)
    row = webhooks.rotate(db, principal().owner, grace)
    db.commit()
    return answer(_out(row))


def _out(row: WebhookSecret) -> WebhookSecretOut:
    valid = row.previous_until is not None and row.previous_until > utcnow()
    return WebhookSecretOut(
        secret=row.secret,
        previous_secret=row.previous_secret if valid else None,
        previous_valid_until=row.previous_until if valid else None,
        rotated_at=row.rotated_at,
    )
