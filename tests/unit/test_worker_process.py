"""A worker's pool process hides the objects it starts with from the cyclic garbage
collector, so a full collection walks only what jobs made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# In a fresh interpreter: load the worker app, start a pool process's life as Celery does
# (the worker_process_init signal), then count what a full collection still walks.
_PROBE = """
import gc
from celery import signals
import workers.main
before = gc.get_freeze_count()
signals.worker_process_init.send(sender=None)
gc.collect()
print(before, gc.get_freeze_count(), len(gc.get_objects()))
"""


def test_a_pool_process_freezes_its_start_up_objects() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=Path(__file__).parents[2],
        env={**os.environ, "KILN_REDIS_URL": "redis://127.0.0.1:1"},
        capture_output=True,
        text=True,
        check=True,
    )
    before, frozen, left = (int(word) for word in done.stdout.split())
    assert before == 0
    assert frozen > 100_000  # torch, SQLAlchemy, Celery and the app
    assert left < frozen / 10  # what a full collection still walks
