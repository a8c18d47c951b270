"""The live workers as the web reads them: their presence records in Redis
(kiln/presence.py), one round trip. GET /api/v1/workers lists them; a queued job's
estimated start spreads the work ahead over their job slots (db/queue_estimate.py)."""

from __future__ import annotations

from celery import Celery
from flask import current_app

from kiln import presence
from kiln.errors import BrokerUnavailable
from kiln.presence import Presence


def read() -> list[Presence]:
    """Every live worker; BrokerUnavailable (503) when Redis does not answer."""
    celery: Celery | None = current_app.extensions.get("kiln.celery")
    if celery is None:  # an app built with a recording sender (tests): no broker at all
        return []
    try:
        with celery.connection_for_read() as connection:
            # One try, two seconds: the page must answer fast when Redis is down.
            connection.ensure_connection(max_retries=1, timeout=2)
            return presence.live(connection.default_channel.client)
    except Exception as exc:
        raise BrokerUnavailable(f"cannot read the workers from Redis: {exc}") from None


def slots(queue: str) -> int | None:
    """The job slots of the live workers consuming `queue`; None when they cannot be read
    (no broker, Redis down, a transport without presence records), and the caller falls
    back on what the database has seen."""
    if current_app.extensions.get("kiln.celery") is None:
        return None
    try:
        live = read()
    except BrokerUnavailable:
        return None
    return presence.slots(live, queue)
