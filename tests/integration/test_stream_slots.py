"""Stream limits per API key, counted in real Redis and shared by every web process (two
StreamSlots here, as two gunicorn processes would have)."""

from __future__ import annotations

from web.stream_slots import StreamSlots, redis_client


def test_a_keys_stream_limit_holds_across_web_processes(redis_url: str) -> None:
    first = StreamSlots(redis_client(redis_url), per_key=2, per_process=8)
    second = StreamSlots(redis_client(redis_url), per_key=2, per_process=8)
    held = [first.take("alice"), second.take("alice")]
    assert all(held)
    assert first.take("alice") is None
    assert second.take("alice") is None
    assert first.take("bob") is not None  # each key has its own limit
    second.release(held[0])  # any process may release; the lease is the key's
    again = second.take("alice")
    assert again is not None
    first.renew(again)
    assert first.take("alice") is None


def test_the_process_limit_is_this_process_s_alone() -> None:
    slots = StreamSlots(None, per_key=10, per_process=1)
    assert slots.take_process_slot()
    assert not slots.take_process_slot()
    slots.release_process_slot()
    assert slots.take_process_slot()
