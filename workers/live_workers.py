"""How many jobs the live workers consuming a queue can run at once, read from their
presence records in Redis (kiln/presence.py): the one place Kiln counts them (a sharded
batch job's `shards: auto`).

One round trip, where a broadcast to the workers (Celery's `inspect`) made every split
wait out its reply timeout. A worker killed without a clean shutdown is still counted
until its record expires (kiln.presence.TTL_S): the job then gets a shard too many, which
waits on the queue for the next free worker, like any job."""

from __future__ import annotations

from celery import Celery

from kiln import presence


def serving(celery: Celery, queue: str) -> int:
    """The job slots (pool processes) of the live workers consuming `queue`; 0 if none."""
    with celery.connection_for_read() as connection:
        return presence.slots(presence.live(connection.default_channel.client), queue)
