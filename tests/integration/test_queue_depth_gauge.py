"""kiln_queue_depth on the web's /metrics, as an autoscaler reads it: every priority level
of a queue counted, and the private queues of live workers (gpu.<n>) listed even when
empty, so a scaler has a series to read before the first message."""

from __future__ import annotations

import re

import pytest
from celery import Celery

from kiln import presence
from kiln.broker import send_run
from kiln.settings import Settings
from web import create_app

pytestmark = pytest.mark.integration


def _depths(client) -> dict[str, float]:
    body = client.get("/metrics").get_data(as_text=True)
    return {
        queue: float(value)
        for queue, value in re.findall(r'^kiln_queue_depth\{queue="([^"]+)"\} (\S+)$', body, re.M)
    }


def test_queue_depth_counts_all_priorities_and_lists_live_workers_queues(
    live_settings: Settings, celery_app: Celery
) -> None:
    with celery_app.connection_for_write() as connection:
        now = presence.now()
        presence.publish(
            connection.default_channel.client,
            presence.Presence(
                name="gpu7@elsewhere", host="elsewhere", pid=1, lane="bulk",
                devices=["gpu7"], queues=["gpu.7", "gpu", "cpu"], concurrency=1,
                started_at=now, heartbeat_at=now,
            ),
        )  # fmt: skip
    app = create_app(live_settings)
    app.extensions["kiln.metrics"].cache_s = 0  # read Redis at each scrape
    try:
        client = app.test_client()
        before = _depths(client)
        assert before["gpu.7"] == 0  # listed while empty: the worker consumes it
        assert {"cpu", "gpu", "interactive.cpu", "interactive.gpu"} <= set(before)

        # API priorities 0 and 9 land in different Redis lists (kombu's priority steps).
        for priority in (0, 9, 5):
            send_run(celery_app, f"job-{priority}", 0, "gpu.7", priority)
        send_run(celery_app, "job-gpu", 0, "gpu", 0)

        after = _depths(client)
        assert after["gpu.7"] == 3
        assert after["gpu"] == 1
    finally:
        app.extensions["kiln.engine"].dispose()
        app.extensions["kiln.celery"].close()
