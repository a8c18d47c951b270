"""Webhook signatures, bodies and the retry schedule (kiln.webhooks), checked against the
`standardwebhooks` package: what Kiln signs, a receiver using the spec's reference library
accepts."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from kiln import webhooks


def test_a_new_secret_is_whsec_and_32_random_bytes() -> None:
    first, second = webhooks.new_secret(), webhooks.new_secret()
    assert first.startswith("whsec_")
    assert first != second
    assert len(Verifier(first)._whsecret) == 32


def _signed(secrets: list[str]) -> tuple[str, dict[str, str]]:
    body = webhooks.body("succeeded", datetime.now(UTC), {"id": "j1", "state": "succeeded"})
    return body, webhooks.headers(secrets, "msg_1", int(time.time()), body)


def test_the_reference_library_verifies_what_kiln_signs() -> None:
    secret = webhooks.new_secret()
    body, headers = _signed([secret])
    assert Verifier(secret).verify(body, headers)["data"] == {"id": "j1", "state": "succeeded"}
    assert headers["webhook-id"] == "msg_1"
    assert headers["content-type"] == "application/json"


def test_another_secret_or_a_changed_body_does_not_verify() -> None:
    body, headers = _signed([webhooks.new_secret()])
    with pytest.raises(WebhookVerificationError):
        Verifier(webhooks.new_secret()).verify(body, headers)
    secret = webhooks.new_secret()
    body, headers = _signed([secret])
    with pytest.raises(WebhookVerificationError):
        Verifier(secret).verify(body.replace("succeeded", "failed"), headers)


def test_during_a_rotation_both_secrets_verify() -> None:
    new, old = webhooks.new_secret(), webhooks.new_secret()
    body, headers = _signed([new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Verifier(new).verify(body, headers)
    assert Verifier(old).verify(body, headers)


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        webhooks.headers([], "msg_1", 1, "{}")


def test_the_body_is_the_spec_envelope_with_the_job() -> None:
    at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    body = json.loads(webhooks.body("progress", at, {"id": "j1", "progress": 0.25, "at": at}))
    assert body == {
        "type": "job.progress",
        "timestamp": "2026-12-03T12:00:00+00:00",
        "data": {"id": "j1", "progress": 0.25, "at": "2026-12-03T12:00:00+00:00"},
    }


def test_retry_delays_double_from_the_base_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 5), (2, 10), (3, 20), (4, 40), (10, 2560), (11, 3600)]:
        delays = [webhooks.retry_delay_s(attempt, 5.0, 3600.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays))
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not one fixed value
    assert webhooks.retry_delay_s(10_000, 5.0, 3600.0, rng) <= 3600.0  # no overflow


def test_the_72_hour_default_allows_dozens_of_attempts() -> None:
    """With the defaults (5 s doubling to an hour, given up after 72 h) a receiver that is
    down for a day still gets the message: the longest wait between attempts is an hour."""
    elapsed, attempts = 0.0, 0
    rng = random.Random(1)
    while elapsed < 72 * 3600:
        attempts += 1
        elapsed += webhooks.retry_delay_s(attempts, 5.0, 3600.0, rng)
    assert attempts > 72  # at least one attempt an hour once the cap is reached


def test_subscriptions_default_to_how_the_job_ended() -> None:
    assert webhooks.subscribed(None, "succeeded")
    assert not webhooks.subscribed(None, "progress")
    assert webhooks.subscribed(["progress"], "progress")
    assert not webhooks.subscribed(["progress"], "failed")
