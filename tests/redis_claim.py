"""A Redis database that no other test run on this machine uses meanwhile.

Runs may overlap (another checkout's suite, CI): two runs sharing a database would consume
each other's job messages, and a worker drops a message naming a job its own database
lacks, so the other run's job would never start. A run therefore claims a database number
with a lock key inside it (SET NX, with an expiry) rather than assuming it free.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

#: The Redis server; each test (or e2e module) takes a database number of its own on it.
REDIS_SERVER = os.environ.get("KILN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
#: Not 9 (tests/integration/ops) nor 14 (bench/scale_out.py, which flushes it).
DATABASES = [n for n in range(0, 16) if n not in (9, 14)]
_LOCK = "kiln-test:lock"
#: How long a claim outlives a run that died without releasing it.
CLAIM_S = 1800


@contextmanager
def claimed_database() -> Iterator[str]:
    """The URL of a claimed database, emptied before and after; skips the test when Redis
    is unreachable."""
    token = uuid.uuid4().hex
    for number in DATABASES:
        url = urlunsplit(urlsplit(REDIS_SERVER)._replace(path=f"/{number}"))
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        try:
            claimed = client.set(_LOCK, token, nx=True, ex=CLAIM_S)
        except redis.RedisError as exc:
            client.close()
            pytest.skip(f"Redis is unreachable at {REDIS_SERVER} (KILN_TEST_REDIS_URL): {exc}")
        if claimed:
            break
        client.close()
    else:
        pytest.fail(f"every test database on {REDIS_SERVER} is claimed by another test run")
    client.flushdb()
    client.set(_LOCK, token, ex=CLAIM_S)  # the flush took the claim with it
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
