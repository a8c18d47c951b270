"""SIGTERM while a job runs asks it to stop; a second SIGTERM, or one while idle, does not."""

from __future__ import annotations

import os
import signal

import pytest

from workers.context import SHUTDOWN
from workers.shutdown import sigterm_stops_the_job


@pytest.fixture
def recorded_sigterm():
    """SIGTERM's handler outside a job records instead of exiting (billiard's would exit)."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    yield seen
    signal.signal(signal.SIGTERM, previous)
    SHUTDOWN.clear()


def test_the_first_sigterm_during_a_job_only_sets_the_flag(recorded_sigterm):
    with sigterm_stops_the_job():
        os.kill(os.getpid(), signal.SIGTERM)
        assert SHUTDOWN.is_set()
        assert recorded_sigterm == []
        os.kill(os.getpid(), signal.SIGTERM)  # the second one goes to the old handler
        assert recorded_sigterm == [signal.SIGTERM]


def test_outside_a_job_sigterm_goes_to_the_old_handler(recorded_sigterm):
    with sigterm_stops_the_job():
        pass
    os.kill(os.getpid(), signal.SIGTERM)

    assert recorded_sigterm == [signal.SIGTERM]
    assert not SHUTDOWN.is_set()
