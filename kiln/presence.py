"""Worker presence in Redis: who is alive, where, on which devices and queues.

Each Celery worker process (workers/presence.py) writes one record under
`kiln:worker:<name>` every BEAT_S seconds, with an expiry of TTL_S, and names itself in
the set `kiln:workers`; it deletes both on a clean shutdown. A worker that dies without
one (kill -9, a lost host) drops out when its record expires. The web
(GET /api/v1/workers) reads every record in one round trip: no broadcast to the workers,
so the answer takes milliseconds whether ten workers are alive or none.

Redis is the broker's (KILN_REDIS_URL): the one service every worker and web host reaches.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

#: Seconds between a worker's writes of its record.
BEAT_S = 10.0
#: A record outlives its last write by this long: three beats missed and it is gone.
TTL_S = 3 * BEAT_S

_INDEX = "kiln:workers"
_PREFIX = "kiln:worker:"


class Presence(BaseModel):
    """One worker process, as it describes itself."""

    name: str
    host: str
    pid: int
    lane: str
    #: The GPUs it may use (CUDA_VISIBLE_DEVICES: "gpu0", "gpu1"), or "cpu" for none.
    devices: list[str]
    queues: list[str]
    concurrency: int
    started_at: datetime
    heartbeat_at: datetime


class RedisLike(Protocol):
    """The few redis-py calls used here (a kombu Redis channel's `client` is one)."""

    def pipeline(self) -> Any: ...
    def smembers(self, name: str) -> Any: ...
    def mget(self, keys: list[str]) -> Any: ...
    def srem(self, name: str, *values: str) -> Any: ...


def devices_of(cuda_visible_devices: str | None) -> list[str]:
    """A worker's devices from its CUDA_VISIBLE_DEVICES ("" is the launcher's CPU worker;
    unset means every GPU of the host, which only the worker itself could count)."""
    if cuda_visible_devices is None:
        return ["all"]
    gpus = [g.strip() for g in cuda_visible_devices.split(",") if g.strip()]
    return [f"gpu{g}" for g in gpus] or ["cpu"]


def publish(client: RedisLike, presence: Presence) -> None:
    """Write (or refresh) one worker's record."""
    pipe = client.pipeline()
    pipe.set(_PREFIX + presence.name, presence.model_dump_json(), ex=int(TTL_S))
    pipe.sadd(_INDEX, presence.name)
    pipe.execute()


def withdraw(client: RedisLike, name: str) -> None:
    """Remove a worker's record: it is shutting down."""
    pipe = client.pipeline()
    pipe.delete(_PREFIX + name)
    pipe.srem(_INDEX, name)
    pipe.execute()


def live(client: RedisLike) -> list[Presence]:
    """Every worker whose record has not expired, by name; names whose record expired are
    dropped from the index as they are found."""
    names = sorted(_text(n) for n in client.smembers(_INDEX))
    if not names:
        return []
    found: list[Presence] = []
    gone: list[str] = []
    for name, raw in zip(names, client.mget([_PREFIX + n for n in names]), strict=True):
        if raw is None:
            gone.append(name)
            continue
        try:
            found.append(Presence.model_validate(json.loads(raw)))
        except (ValueError, ValidationError):
            gone.append(name)  # not a record this version can read: leave it to expire
    if gone:
        client.srem(_INDEX, *gone)
    return found


def slots(records: list[Presence], queue: str) -> int:
    """How many jobs the workers of `records` consuming `queue` can run at once (their pool
    processes); 0 when none does."""
    return sum(record.concurrency for record in records if queue in record.queues)


def now() -> datetime:
    return datetime.now(UTC)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
