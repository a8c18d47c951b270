"""Job webhooks, the parts every process shares: events, secrets, signatures, bodies and
the retry schedule, after the Standard Webhooks spec (https://www.standardwebhooks.com).

A delivery is a POST of a JSON body with three headers: `webhook-id` (the message's id,
the same on every retry, for the receiver to de-duplicate), `webhook-timestamp` (Unix
seconds of this attempt) and `webhook-signature`: `v1,<base64 HMAC-SHA256>` of
`{id}.{timestamp}.{body}` under the owner's `whsec_` secret, one such entry per secret
that is valid (two, space-separated, while a rotated-out secret's grace period lasts).
The signing is written here (it is a few lines) and checked against the `standardwebhooks`
package in the tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal, NamedTuple

#: What a job may ask to be told about.
Event = Literal["running", "progress", "succeeded", "failed", "cancelled"]
EVENTS: tuple[Event, ...] = ("running", "progress", "succeeded", "failed", "cancelled")
#: The events a job with a webhook_url and no webhook_events gets: how it ended.
DEFAULT_EVENTS: tuple[Event, ...] = ("succeeded", "failed", "cancelled")
#: The prefix of every secret (the spec's convention): the rest is base64 of the key bytes.
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
_SECRET_BYTES = 32
#: Spreads retries apart (not a secret: no cryptographic randomness needed).
_JITTER = random.Random()  # noqa: S311
#: The longest webhook_url accepted.
MAX_URL_LENGTH = 2048


class Webhook(NamedTuple):
    """Where a job's events go, and which of them."""

    url: str
    events: tuple[Event, ...] = DEFAULT_EVENTS


def new_secret() -> str:
    """A fresh signing secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """One `v1,<signature>` entry of the webhook-signature header."""
    signed = f"{message_id}.{timestamp}.{body}".encode()
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets_: Sequence[str], message_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The headers of one delivery attempt, signed with every secret given (newest first)."""
    if not secrets_:
        raise ValueError("a delivery needs at least one secret to sign with")
    return {
        "content-type": "application/json",
        "user-agent": "Kiln-Webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, message_id, timestamp, body) for s in secrets_),
    }


def body(event: Event, at: datetime, job: dict[str, Any]) -> str:
    """The JSON body of an event, fixed when the event happens (every retry sends these
    bytes). Thin on purpose: the job's state, not its result (which can be megabytes of
    predictions); a receiver reads that from GET /api/v1/jobs/<id>."""
    envelope = {"type": f"job.{event}", "timestamp": at.isoformat(), "data": job}
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True, default=_iso)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def retry_delay_s(
    attempts: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """How long to wait after the `attempts`-th failed attempt: base * 2**(attempts-1),
    capped at max_s, with "equal jitter" (between half and all of it), so receivers that
    came back are not hit by every waiting message at once."""
    ceiling = min(max_s, base_s * 2.0 ** min(max(attempts - 1, 0), 62))
    return ceiling / 2 + (rng or _JITTER).uniform(0, ceiling / 2)


def subscribed(events: Iterable[str] | None, event: str) -> bool:
    """Whether a job whose webhook_events are `events` wants `event`."""
    return event in (DEFAULT_EVENTS if events is None else tuple(events))
