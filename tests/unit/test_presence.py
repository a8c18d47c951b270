"""kiln.presence: worker records in Redis (fakeredis here; the live path is in
tests/integration/ops/test_ops_clients.py)."""

from __future__ import annotations

from datetime import timedelta

import fakeredis
import pytest

from kiln import presence
from kiln.presence import Presence


def _record(name: str, **changes: object) -> Presence:
    now = presence.now()
    fields = {
        "name": name, "host": "h", "pid": 1, "lane": "bulk", "devices": ["cpu"],
        "queues": ["cpu"], "concurrency": 1, "started_at": now, "heartbeat_at": now,
    }  # fmt: skip
    return Presence.model_validate(fields | changes)


def test_published_records_are_live_until_they_expire_or_are_withdrawn() -> None:
    redis = fakeredis.FakeRedis()
    presence.publish(redis, _record("a@h"))
    presence.publish(redis, _record("b@h", devices=["gpu0", "gpu1"]))
    assert [(p.name, p.devices) for p in presence.live(redis)] == [
        ("a@h", ["cpu"]), ("b@h", ["gpu0", "gpu1"])
    ]  # fmt: skip
    assert 0 < redis.ttl("kiln:worker:a@h") <= presence.TTL_S

    presence.withdraw(redis, "a@h")
    redis.delete("kiln:worker:b@h")  # what expiry does to a worker killed with -9
    assert presence.live(redis) == []
    assert redis.smembers("kiln:workers") == set()  # the expired name was dropped too


def test_a_record_this_version_cannot_read_is_skipped_not_raised() -> None:
    redis = fakeredis.FakeRedis()
    presence.publish(redis, _record("good@h"))
    redis.set("kiln:worker:odd@h", b"{not json")
    redis.sadd("kiln:workers", "odd@h")
    assert [p.name for p in presence.live(redis)] == ["good@h"]


def test_a_refreshed_record_carries_the_new_heartbeat() -> None:
    redis = fakeredis.FakeRedis()
    first = _record("a@h")
    presence.publish(redis, first)
    later = first.model_copy(update={"heartbeat_at": first.heartbeat_at + timedelta(seconds=10)})
    presence.publish(redis, later)
    assert presence.live(redis)[0].heartbeat_at == later.heartbeat_at


def test_slots_add_up_the_pool_processes_of_live_workers_on_the_queue() -> None:
    redis = fakeredis.FakeRedis()
    presence.publish(redis, _record("a@h", queues=["interactive.cpu", "cpu"]))
    presence.publish(redis, _record("b@h", queues=["cpu"], concurrency=3))
    presence.publish(redis, _record("c@h", queues=["gpu"], devices=["gpu0"]))
    presence.publish(redis, _record("d@h", queues=["cpu"]))
    redis.delete("kiln:worker:d@h")  # expired: killed without a clean shutdown

    live = presence.live(redis)
    assert presence.slots(live, "cpu") == 4
    assert presence.slots(live, "gpu") == 1
    assert presence.slots(live, "interactive.gpu") == 0


@pytest.mark.parametrize(
    ("visible", "devices"),
    [("", ["cpu"]), ("0", ["gpu0"]), ("0,1", ["gpu0", "gpu1"]), (None, ["all"])],
)
def test_devices_come_from_cuda_visible_devices(visible: str | None, devices: list[str]) -> None:
    assert presence.devices_of(visible) == devices
