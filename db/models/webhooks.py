"""Webhooks: each owner's signing secrets, the outbox of messages, and every delivery attempt.

A message is written in the same transaction as the job's state change it reports
(db.webhooks.on_transition), so no committed change lacks its message and no message
reports a change that was rolled back; delivery processes send it from here.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, UTCDateTime, utcnow

#: A message's states: waiting to be (re)sent, received with a 2xx, or given up.
MESSAGE_STATES = ("pending", "delivered", "failed")


class WebhookSecret(Base):
    """An owner's signing secrets. Kept in clear: signing needs the secret itself."""

    __tablename__ = "webhook_secrets"

    owner: Mapped[str] = mapped_column(String(100), primary_key=True)
    #: `whsec_` + base64: signs every delivery.
    secret: Mapped[str] = mapped_column(String(100))
    #: The secret before the last rotation, which also signs until previous_until.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookMessage(Base):
    """One event of one job, to be delivered to the job's webhook_url at least once."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (
        CheckConstraint(
            "state IN ({})".format(", ".join(f"'{s}'" for s in MESSAGE_STATES)),
            name="state_known",
        ),
        # What delivery processes look for: pending messages by when they are due.
        Index("ix_webhook_outbox_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_webhook_outbox_job_id_event", "job_id", "event"),
    )

    #: The webhook-id header: the same on every attempt, for receivers to de-duplicate.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    #: The job's owner, whose secrets sign it.
    owner: Mapped[str] = mapped_column(String(100))
    #: running, progress, succeeded, failed or cancelled (kiln.webhooks.EVENTS).
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    #: The JSON body, fixed at the event: every attempt sends these bytes.
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    #: Attempts started (counted when claimed, so one that died with its process counts).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Held by a delivery process until then (None: nobody holds it).
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Which claim holds the lease; only that claim may schedule the next attempt.
    lease_token: Mapped[str | None] = mapped_column(String(32))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One attempt to deliver a message, as GET /jobs/<id>/deliveries shows it."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_outbox.id", ondelete="CASCADE"), index=True
    )
    #: 1 for the first attempt.
    number: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: The receiver's HTTP status; None when no answer came (error says why).
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
