"""Rate limits on Redis storage: every web process shares one count per key."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_two_web_processes_share_one_rate_limit_per_key(make_app, redis_server, alice, bob):
    server = redis_server("--save", "", "--appendonly", "no")
    first = make_app(rate_limit="4/minute", redis_url=server.url).test_client()
    second = make_app(rate_limit="4/minute", redis_url=server.url).test_client()

    codes = [
        client.get("/api/v1/jobs", headers=alice).status_code for client in [first, second] * 2
    ]
    over = second.get("/api/v1/jobs", headers=alice)

    assert codes == [200, 200, 200, 200]
    assert over.status_code == 429
    assert int(over.headers["Retry-After"]) > 0
    assert first.get("/api/v1/jobs", headers=bob).status_code == 200
    assert any(
        b"kiln-limits" in key or key.startswith(b"LIMITS") for key in server.client().scan_iter()
    )
