"""How many streams may be open: per API key (across every web process, counted in Redis),
and per web process (the threads gunicorn set aside for streams).

A key's open streams are members of a Redis sorted set scored by when they lapse; an open
stream renews its lease at every keep-alive, so the streams of a web process that died
stop counting within `LEASE_S`. Without Redis (a test app) the count is this process's.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

#: A stream that has not renewed for this long no longer counts against its key.
LEASE_S = 60.0

_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def redis_client(url: str) -> redis.Redis | None:
    """A Redis client for Kiln's URL (kombu's `redis+socket://` included), or None."""
    if url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"), socket_timeout=2)
    if url.startswith(("redis://", "rediss://")):
        return redis.Redis.from_url(url, socket_timeout=2)
    return None


@dataclass(frozen=True)
class Slot:
    """One open stream's place: the key's set and its member."""

    key: str
    member: str


class StreamSlots:
    """Admits streams up to `per_key` per caller and `per_process` in this process."""

    def __init__(self, client: redis.Redis | None, per_key: int, per_process: int) -> None:
        self._redis = client
        self._acquire = client.register_script(_ACQUIRE) if client is not None else None
        self.per_key = per_key
        self.per_process = per_process
        self._lock = threading.Lock()
        self._in_process = 0
        self._local: dict[str, int] = {}

    def take_process_slot(self) -> bool:
        with self._lock:
            if self._in_process >= self.per_process:
                return False
            self._in_process += 1
            return True

    def release_process_slot(self) -> None:
        with self._lock:
            self._in_process -= 1

    def take(self, caller: str) -> Slot | None:
        """A place for one more stream of `caller` (a key digest), or None at its limit."""
        slot = Slot(f"kiln:streams:{caller}", uuid.uuid4().hex)
        if self._acquire is not None:
            now = time.time()
            try:
                args: list[float | str] = [now, self.per_key, now + LEASE_S, slot.member]
                args.append(int(LEASE_S) + 1)
                return slot if self._acquire(keys=[slot.key], args=args) == 1 else None
            except redis.RedisError:
                # A Redis outage must not take streams down with it: count here meanwhile.
                log.warning("stream limit: Redis unreachable; counting in this process")
        with self._lock:
            if self._local.get(slot.key, 0) >= self.per_key:
                return None
            self._local[slot.key] = self._local.get(slot.key, 0) + 1
            return Slot(slot.key, "local:" + slot.member)

    def renew(self, slot: Slot) -> None:
        if self._redis is not None and not slot.member.startswith("local:"):
            try:
                self._redis.zadd(slot.key, {slot.member: time.time() + LEASE_S}, xx=True)
            except redis.RedisError:
                log.warning("stream limit: could not renew a lease in Redis")

    def release(self, slot: Slot) -> None:
        if slot.member.startswith("local:"):
            with self._lock:
                self._local[slot.key] -= 1
                if self._local[slot.key] <= 0:
                    del self._local[slot.key]
            return
        if self._redis is not None:
            try:
                self._redis.zrem(slot.key, slot.member)
            except redis.RedisError:
                log.warning("stream limit: could not release a lease in Redis (it lapses)")
