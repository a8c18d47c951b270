"""Sharded batch jobs, short of real workers: splitting rows, the spec's `shards`, reading a
dataset from a row, and the parent's moves in the database (db/shards.py, db/jobs.py) on
SQLite and PostgreSQL. tests/integration/test_sharded_batch.py runs them with workers."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import jobs, shards
from db.models import Job
from kiln import datasets
from kiln.states import JobState
from tests.unit.test_ui import _sign_in
from workers.runners.batch_shards import split_rows

SPEC = {"model": "m", "dataset": "d", "shards": 3}

# --- splitting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "shards", "chunk", "expected"),
    [
        (100, 2, 10, [(0, 50), (50, 100)]),
        (100, 3, 10, [(0, 30), (30, 60), (60, 100)]),
        (95, 2, 10, [(0, 50), (50, 95)]),  # the last chunk is short
        (25, 8, 10, [(0, 10), (10, 20), (20, 25)]),  # no more shards than chunks
        (5, 4, 10, [(0, 5)]),  # one chunk: one piece
        (0, 4, 10, []),
        (1_000_000, 1, 16_384, [(0, 1_000_000)]),
    ],
)
def test_split_rows_cuts_whole_chunks_in_order(rows, shards, chunk, expected):
    assert split_rows(rows, shards, chunk) == expected


@pytest.mark.parametrize("rows", [1, 999, 16_384, 16_385, 10**8 + 7])
@pytest.mark.parametrize("shards", [1, 2, 7, 256])
def test_split_rows_covers_every_row_once_on_chunk_bounds(rows, shards):
    chunk = 16_384
    ranges = split_rows(rows, shards, chunk)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == rows
    assert all(stop > start for start, stop in ranges)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(start % chunk == 0 for start, _ in ranges)
    sizes = [stop - start for start, stop in ranges[:-1]]
    assert not sizes or max(sizes) - min(sizes) <= chunk  # as even as whole chunks allow


# --- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shards", [0, -1, "x", "0", 257, 10**9, True, 1.5, 2.0, None, [2], "9" * 5000]
)
def test_a_bad_shards_value_is_refused_with_422(client, alice, shards):
    body = {"kind": "batch_predict", "spec": {"model": "m", "dataset": "d", "shards": shards}}
    response = client.post("/api/v1/jobs", json=body, headers=alice)

    assert response.status_code == 422, response.get_json()
    problem = response.get_json()
    assert problem["code"] == "invalid_spec"
    # One error, in words, at spec.shards (not one per member of the union).
    [error] = [e for e in problem["errors"] if e["loc"][:2] == ["spec", "shards"]]
    assert error["loc"] == ["spec", "shards"]
    assert "whole number of shards (1 to 256) or 'auto'" in error["msg"]


@pytest.mark.parametrize(
    ("shards", "stored"), [(1, 1), (8, 8), (256, 256), ("auto", "auto"), ("4", 4)]
)
def test_shards_a_number_or_auto_is_accepted(
    client, alice, sent, version_row, dataset_row, shards, stored
):
    version_row("m")
    spec = {"model": "m", "dataset": dataset_row(), "shards": shards}
    body = {"kind": "batch_predict", "spec": spec}
    response = client.post("/api/v1/jobs", json=body, headers=alice)

    assert response.status_code == 202, response.get_json()
    assert response.get_json()["spec"]["shards"] == stored
    assert len(sent) == 1  # the parent alone: it splits when a worker runs it


def test_an_unknown_output_layout_is_refused(client, alice):
    spec = {"model": "m", "dataset": "d", "shards": 2, "output_layout": "zip"}
    response = client.post(
        "/api/v1/jobs", json={"kind": "batch_predict", "spec": spec}, headers=alice
    )
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["loc"] == ["spec", "output_layout"]


# --- reading from a row -------------------------------------------------------------------------


def _table(rows: int) -> pa.Table:
    return pa.table({"id": pa.array(range(rows)), "x": pa.array([i * 0.5 for i in range(rows)])})


@pytest.mark.parametrize("start", [0, 1, 99, 100, 250, 999, 1000])
def test_iter_batches_from_a_row_gives_the_rows_from_there_in_whole_batches(tmp_path, start):
    table = _table(1000)
    parquet, csv = tmp_path / "t.parquet", tmp_path / "t.csv"
    pq.write_table(table, parquet, row_group_size=100)  # ten row groups: most are skipped
    pacsv.write_csv(table, csv)
    for path, fmt in ((parquet, "parquet"), (csv, "csv")):
        batches = list(datasets.iter_batches(path, fmt, 64, start))
        ids = [i for b in batches for i in b.column("id").to_pylist()]
        assert ids == list(range(start, 1000)), fmt
        assert all(b.num_rows == 64 for b in batches[:-1])


# --- the parent's moves in the database ---------------------------------------------------------


def _running_parent(sessions: sessionmaker[Session]) -> Job:
    with sessions() as session:
        parent = jobs.create(
            session, kind="batch_predict", owner="alice", spec=SPEC, queue="cpu", priority=3
        )
        session.commit()
        assert jobs.claim(session, parent.id, 0, "w1", "cpu") == 1
        session.commit()
        session.refresh(parent)
        return parent


def _fan_out(
    sessions: sessionmaker[Session], ranges: list[tuple[int, int]]
) -> tuple[str, list[str]]:
    parent = _running_parent(sessions)
    with sessions() as session:
        row = session.get_one(Job, parent.id)
        children = shards.fan_out(session, row, 1, {**SPEC, "shards": 1}, ranges)
        assert children is not None
        session.commit()
        return parent.id, [c.id for c in children]


def _run_child(session: Session, child_id: str, ending: str = "succeeded") -> None:
    attempt = jobs.claim(session, child_id, 0, "w2", "cpu")
    assert attempt is not None
    if ending == "succeeded":
        assert jobs.succeed(session, child_id, attempt, {"rows": 1})
    elif ending == "failed":
        assert jobs.fail(session, child_id, attempt, "JobFailure", "bad rows")
    session.commit()


class Sends:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def __call__(self, job: Any, countdown: float = 0.0) -> None:
        self.sent.append((job.id, job.attempt))


def test_fan_out_queues_the_shards_and_the_parent_holds_no_worker(sessions):
    parent_id, child_ids = _fan_out(sessions, [(0, 10), (10, 20), (20, 25)])

    with sessions() as session:
        parent = session.get_one(Job, parent_id)
        assert parent.state == JobState.RUNNING
        assert parent.awaiting_shards
        assert parent.shard_count == 3
        assert parent.worker is None
        assert parent.heartbeat_at is None
        children = shards.children(session, parent_id)
        assert [c.id for c in children] == child_ids
        assert [(c.shard_index, c.row_start, c.row_stop) for c in children] == [
            (0, 0, 10), (1, 10, 20), (2, 20, 25)
        ]  # fmt: skip
        assert all(c.state == JobState.QUEUED and c.priority == 3 for c in children)
        assert all(c.spec["shards"] == 1 for c in children)
        # Not a stalled job (it has no heartbeat to miss), and its shards use no quota.
        assert parent_id not in {j.id for j in jobs.stalled(session, timedelta(seconds=-60))}
        assert jobs.count_queued(session, "alice") == 0
        listed = {j.id for j in jobs.listed(session, "alice").jobs}
        assert listed == {parent_id}
        assert {j.id for j in jobs.listed(session, "alice", parent=parent_id).jobs} == set(
            child_ids
        )
        assert len(jobs.listed(session, "alice", include_shards=True).jobs) == 4


def test_fan_out_loses_to_a_cancel_request_and_creates_nothing(sessions):
    parent = _running_parent(sessions)
    with sessions() as session:
        jobs.request_cancel(session, session.get_one(Job, parent.id))
        session.commit()
        row = session.get_one(Job, parent.id)
        assert shards.fan_out(session, row, 1, SPEC, [(0, 1), (1, 2)]) is None
        session.rollback()
        assert shards.children(session, parent.id) == []
        assert not session.get_one(Job, parent.id).awaiting_shards


def test_the_last_shard_to_succeed_queues_the_parent_once(sessions):
    parent_id, child_ids = _fan_out(sessions, [(0, 10), (10, 20)])
    send = Sends()
    with sessions() as session:
        _run_child(session, child_ids[0])
        assert shards.settle(session, send, parent_id) is None  # one still queued
        parent = session.get_one(Job, parent_id)
        session.refresh(parent)
        assert parent.state == JobState.RUNNING
        assert parent.message.startswith("1/2 shards done")
        _run_child(session, child_ids[1])
        assert shards.settle(session, send, parent_id) == "assembling"
        assert shards.settle(session, send, parent_id) is None  # settled once only
    assert send.sent == [(parent_id, 1)]
    with sessions() as session:
        parent = session.get_one(Job, parent_id)
        assert parent.state == JobState.QUEUED
        assert not parent.awaiting_shards
        assert parent.charged_attempts == 0  # the splitting attempt is not charged
        assert parent.sent_at is not None
        # The assembling attempt claims it like any queued job.
        assert jobs.claim(session, parent_id, 1, "w3", "cpu") == 2


def test_a_failed_shard_fails_the_parent_and_cancels_the_others(sessions):
    parent_id, child_ids = _fan_out(sessions, [(0, 10), (10, 20), (20, 30)])
    send = Sends()
    with sessions() as session:
        assert jobs.claim(session, child_ids[2], 0, "w2", "cpu") == 1  # running
        session.commit()
        _run_child(session, child_ids[0], "failed")
        assert shards.settle(session, send, parent_id) == "failed"
    assert send.sent == []
    with sessions() as session:
        parent = session.get_one(Job, parent_id)
        assert parent.state == JobState.FAILED
        assert parent.error_type == "ShardFailed"
        assert f"shard 0 (job {child_ids[0]}) failed: bad rows" in (parent.error_message or "")
        queued, running = session.get_one(Job, child_ids[1]), session.get_one(Job, child_ids[2])
        assert queued.state == JobState.CANCELLED
        assert running.state == JobState.RUNNING
        assert running.cancel_requested


def test_cancelling_the_parent_cancels_its_shards(sessions):
    parent_id, child_ids = _fan_out(sessions, [(0, 10), (10, 20), (20, 30)])
    with sessions() as session:
        _run_child(session, child_ids[0])
        assert jobs.claim(session, child_ids[1], 0, "w2", "cpu") == 1
        session.commit()
        jobs.request_cancel(session, session.get_one(Job, parent_id))
        session.commit()
    with sessions() as session:
        states = {c.id: (c.state, c.cancel_requested) for c in shards.children(session, parent_id)}
        assert session.get_one(Job, parent_id).state == JobState.CANCELLED
        assert states[child_ids[0]] == (JobState.SUCCEEDED, False)
        assert states[child_ids[1]] == (JobState.RUNNING, True)  # stops at its next step
        assert states[child_ids[2]] == (JobState.CANCELLED, True)
        # The running shard then stops: settling finds the parent no longer waiting.
        assert jobs.mark_cancelled(session, child_ids[1], 1)
        session.commit()
        assert shards.settle(session, Sends(), parent_id) is None


def test_the_api_shows_the_shards_and_their_combined_progress(sessions, client, alice):
    parent_id, child_ids = _fan_out(sessions, [(0, 100), (100, 200)])
    with sessions() as session:
        _run_child(session, child_ids[0])
        assert jobs.claim(session, child_ids[1], 0, "w2", "cpu") == 1
        assert jobs.report(session, child_ids[1], 1, 0.5, "half") is not None
        session.commit()

    body = client.get(f"/api/v1/jobs/{parent_id}", headers=alice).get_json()
    assert [(s["index"], s["state"], s["rows"], s["rows_done"]) for s in body["shards"]] == [
        (0, "succeeded", 100, 100),
        (1, "running", 100, 50),
    ]
    assert body["progress"] == pytest.approx(0.75)
    assert body["message"].startswith("1/2 shards done, 150/200 rows")
    listing = client.get("/api/v1/jobs", headers=alice).get_json()["jobs"]
    assert [j["id"] for j in listing] == [parent_id]  # shards hidden by default
    children = client.get(f"/api/v1/jobs?parent={parent_id}", headers=alice).get_json()["jobs"]
    assert {j["id"] for j in children} == set(child_ids)
    assert all(j["parent_id"] == parent_id for j in children)
    bad = client.get("/api/v1/jobs?include_shards=maybe", headers=alice)
    assert bad.status_code == 400


def test_the_combined_rate_stops_at_the_last_shards_end(sessions):
    parent_id, child_ids = _fan_out(sessions, [(0, 100), (100, 200)])
    with sessions() as session:
        for child_id in child_ids:
            _run_child(session, child_id)
        children = shards.children(session, parent_id)
        parent = session.get_one(Job, parent_id)
        last_end = max(child.finished_at for child in children if child.finished_at)
        split_at = min(child.created_at for child in children)

        at_end = shards.summary(parent, children, now=last_end)
        a_day_later = shards.summary(parent, children, now=last_end + timedelta(days=1))

    assert at_end.rows_per_s == pytest.approx(200 / (last_end - split_at).total_seconds())
    assert a_day_later.rows_per_s == at_end.rows_per_s  # a finished job's rate stays put
    assert a_day_later.eta_s is None  # nothing left: no "about 0s left"
    assert a_day_later.message.startswith("2/2 shards done, 200/200 rows, ")
    assert "left" not in a_day_later.message


def test_the_job_page_lists_the_shards_and_a_shard_links_its_parent(sessions, client, create_key):
    parent_id, child_ids = _fan_out(sessions, [(0, 100), (100, 200)])
    with sessions() as session:
        _run_child(session, child_ids[0])
    _sign_in(client, create_key("alice"))

    page = client.get(f"/jobs/{parent_id}").text
    assert 'id="job-shards"' in page
    assert "1/2 shards done, 100/200 rows" in page
    assert all(f"/jobs/{child_id}" in page for child_id in child_ids)
    shard_page = client.get(f"/jobs/{child_ids[1]}").text
    assert f'<a href="/jobs/{parent_id}">job {parent_id}</a>' in shard_page
    assert "Shard 1 (rows 100\u2013200)" in shard_page
    listed = client.get("/jobs/table").text
    assert parent_id in listed
    assert not any(child_id in listed for child_id in child_ids)


def test_cancelling_a_queued_shard_cancels_its_parent_and_the_other_shards(sessions):
    parent_id, child_ids = _fan_out(sessions, [(0, 10), (10, 20)])
    with sessions() as session:
        jobs.request_cancel(session, session.get_one(Job, child_ids[1]))
        session.commit()
    with sessions() as session:
        parent = session.get_one(Job, parent_id)
        assert parent.state == JobState.CANCELLED
        assert f"shard 1 (job {child_ids[1]}) was cancelled" in parent.message
        assert [c.state for c in shards.children(session, parent_id)] == ["cancelled"] * 2
