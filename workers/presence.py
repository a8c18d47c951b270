"""A worker process's presence record (kiln.presence): written when the worker is ready,
refreshed every kiln.presence.BEAT_S by a thread of the worker's main process, deleted
at shutdown.

The main process (not a pool process) beats: it is the one that consumes messages, so a
record that stays fresh means the worker still takes work; a job that hangs its pool
process shows as the worker's current job with a stale job heartbeat instead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery import Celery

from kiln import presence, routing
from kiln.presence import Presence

log = logging.getLogger(__name__)


class PresenceBeat:
    """The thread that keeps one worker's record fresh."""

    def __init__(self, celery: Celery, record: Presence) -> None:
        self.celery = celery
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-presence", daemon=True)

    def start(self) -> None:
        self._beat()  # at once: the worker is listed as soon as it is ready
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            with self.celery.connection_for_write() as connection:
                presence.withdraw(connection.default_channel.client, self.record.name)
        except Exception as exc:  # the record expires on its own
            log.warning("event=presence_withdraw_failed error=%s", exc)

    def _run(self) -> None:
        while not self._stop.wait(presence.BEAT_S):
            self._beat()

    def _beat(self) -> None:
        self.record = self.record.model_copy(update={"heartbeat_at": presence.now()})
        try:
            with self.celery.connection_for_write() as connection:
                presence.publish(connection.default_channel.client, self.record)
        except Exception as exc:  # a broker blip: the next beat tries again
            log.warning("event=presence_failed error=%s", exc)


def record_for(hostname: str, queues: list[str], concurrency: int) -> Presence:
    """This process's record: `hostname` is Celery's (gpu0@host), queues in its order."""
    started = presence.now()
    return Presence(
        name=hostname,
        host=socket.gethostname(),
        pid=os.getpid(),
        lane=routing.lane_of_queue(queues[0]) if queues else routing.BULK,
        devices=presence.devices_of(os.environ.get("CUDA_VISIBLE_DEVICES")),
        queues=queues,
        concurrency=concurrency,
        started_at=started,
        heartbeat_at=started,
    )
