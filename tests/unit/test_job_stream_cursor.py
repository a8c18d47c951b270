"""db.job_stream: the stream cursor's encoding, and which snapshot events a cursor is owed."""

from __future__ import annotations

import pytest

from db.job_stream import Cursor, Snapshot, snapshot_items
from kiln.errors import InvalidRequest


def _snapshot(state: str = "running", attempt: int = 1, progress: float = 0.5) -> Snapshot:
    return Snapshot(state, attempt, progress, "msg", None, None, None, None)


def test_a_cursor_round_trips_through_its_event_id() -> None:
    snap = _snapshot()
    cursor = Cursor(12, 7, snap.state_key, snap.progress_key)
    assert Cursor.decode(cursor.encode()) == cursor
    assert Cursor.decode(Cursor(3, 4).encode()) == Cursor(3, 4)
    assert Cursor.decode("41") == Cursor(log_id=41)


@pytest.mark.parametrize(
    "bad", ["", "x", "-1", "1.2.3", "1.2.1.sleeping.5.0", "1.2.1.running.5.zz", "1" * 30, "1.2.3.4"]
)
def test_a_cursor_the_api_never_sent_is_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        Cursor.decode(bad)


def test_a_fresh_reader_gets_one_state_event_carrying_the_progress() -> None:
    [item] = snapshot_items(_snapshot(), Cursor())
    assert item.type == "state"
    assert (item.data["state"], item.data["progress"], item.data["message"]) == (
        "running",
        0.5,
        "msg",
    )
    assert snapshot_items(_snapshot(), item.cursor) == []


def test_moved_progress_is_a_progress_event_and_a_new_attempt_is_a_state_event() -> None:
    [first] = snapshot_items(_snapshot(), Cursor())
    [moved] = snapshot_items(_snapshot(progress=0.75), first.cursor)
    assert (moved.type, moved.data["progress"]) == ("progress", 0.75)
    # Re-queued and running again: the same state, another attempt.
    [again] = snapshot_items(_snapshot(attempt=2, progress=0.0), moved.cursor)
    assert (again.type, again.data["attempt"]) == ("state", 2)
