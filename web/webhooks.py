"""The web's part of job webhooks, shared by the API and the UI: where a webhook_url may
point (checked at submission, against the operator's policy), and a job's deliveries as
the API shows them."""

from __future__ import annotations

from flask import current_app
from sqlalchemy.orm import Session

from db import webhooks as webhook_rows
from kiln import egress
from kiln.errors import WebhookRefused
from kiln.schemas import DeliveryAttemptOut, DeliveryList, WebhookMessageOut
from kiln.settings import Settings
from kiln.webhooks import Webhook


def checked(webhook: Webhook | None) -> Webhook | None:
    """The webhook, if its URL may be requested now (WebhookRefused, 422, otherwise). The
    host is resolved here, and again at every delivery: an answer that changes later is
    caught then (kiln.egress)."""
    if webhook is not None:
        settings: Settings = current_app.config["KILN_SETTINGS"]
        try:
            egress.check_url(webhook.url, settings.egress_policy)
        except egress.Refused as exc:
            why = str(exc)
            if isinstance(exc, egress.NotPublic):
                why += (
                    "; the server's operator can allow such addresses with "
                    "KILN_WEBHOOK_ALLOW_PRIVATE=1 or KILN_WEBHOOK_ALLOWED_CIDRS"
                )
            raise WebhookRefused(
                f"webhook_url refused: {why}", [{"loc": ["webhook_url"], "msg": why}]
            ) from None
    return webhook


def deliveries(session: Session, job_id: str) -> DeliveryList:
    """Every message of the job, oldest first, each with its attempts."""
    messages = []
    for message, attempts in webhook_rows.messages_of(session, job_id):
        out = [
            DeliveryAttemptOut(
                number=a.number,
                at=a.at,
                outcome="delivered" if _ok(a.status_code) else "failed",
                status_code=a.status_code,
                latency_ms=a.latency_ms,
                error=a.error,
            )
            for a in attempts
        ]
        pending = message.state == "pending"
        messages.append(
            WebhookMessageOut.model_validate(
                {
                    "id": message.id,
                    "event": message.event,
                    "url": message.url,
                    "state": message.state,
                    "attempts": message.attempts,
                    "created_at": message.created_at,
                    "next_attempt_at": message.next_attempt_at if pending else None,
                    "delivered_at": message.delivered_at,
                    "deliveries": out,
                }
            )
        )
    return DeliveryList(job_id=job_id, messages=messages)


def _ok(status: int | None) -> bool:
    return status is not None and 200 <= status < 300
