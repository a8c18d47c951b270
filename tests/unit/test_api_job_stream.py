"""GET /api/v1/jobs/<id>/stream against the real database (SQLite and PostgreSQL): the job's
rows are written with the db.jobs functions the workers use, between reads of the stream,
so each test knows exactly which events are owed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from db import jobs
from db.models import Job
from kiln import sse
from kiln.states import JobState

Reader = Callable[..., "Stream"]


class Stream:
    """One open stream through the test client, read event by event."""

    def __init__(self, response: TestResponse) -> None:
        self.response = response
        self.parser = sse.Parser()
        self._chunks: Iterator[bytes] = iter(response.response)  # type: ignore[arg-type]
        self._pending: list[sse.Event] = []
        self.ended = False

    def next(self) -> sse.Event | None:
        """The next event; None once the server ended the stream."""
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self.ended = True
                self.close()  # as a WSGI server does once the body is sent
                return None
            self._pending.extend(self.parser.feed(chunk))
        return self._pending.pop(0)

    def take(self, count: int) -> list[dict[str, Any]]:
        found = []
        for _ in range(count):
            event = self.next()
            assert event is not None, f"the stream ended after {found}"
            found.append({"event_id": event.id, **event.json()})
        return found

    def rest(self) -> list[dict[str, Any]]:
        found = []
        while (event := self.next()) is not None:
            found.append({"event_id": event.id, **event.json()})
        return found

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def stream_app(make_app: Callable[..., Flask]) -> Flask:
    # A keep-alive every 0.2 s: a test waiting on an idle stream sees comments, not a hang.
    return make_app(stream_keepalive_s=0.2, streams_per_key=2)


@pytest.fixture
def open_stream(stream_app: Flask) -> Iterator[Reader]:
    client = stream_app.test_client()
    opened: list[Stream] = []

    def open_(job_id: str, headers: dict[str, str], **query: str) -> Stream:
        response = client.get(
            f"/api/v1/jobs/{job_id}/stream", headers=headers, query_string=query, buffered=False
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.mimetype == "text/event-stream"
        stream = Stream(response)
        opened.append(stream)
        return stream

    yield open_
    for stream in opened:
        stream.close()


def _running(sessions: sessionmaker[Session], create_job: Callable[..., Job]) -> str:
    job = create_job(state=JobState.RUNNING)
    return job.id


def _report(
    sessions: sessionmaker[Session],
    job_id: str,
    *,
    logs: list[str] = (),  # type: ignore[assignment]
    points: list[tuple[str, int, float]] = (),  # type: ignore[assignment]
    progress: tuple[float, str] | None = None,
) -> None:
    """One worker report: what RunContext.sync writes, in one transaction."""
    with sessions() as session:
        if progress is not None:
            assert jobs.report(session, job_id, 1, *progress) is not None
        jobs.log_lines(session, job_id, [(line, "info") for line in logs])
        jobs.record_metrics(session, job_id, list(points))
        session.commit()


def _succeed(sessions: sessionmaker[Session], job_id: str, last_log: str) -> None:
    with sessions() as session:
        jobs.log(session, job_id, last_log)
        assert jobs.succeed(session, job_id, 1, {"done": True})
        session.commit()


def test_a_stream_sends_state_progress_metrics_and_logs_and_ends_after_the_final_state(
    sessions: sessionmaker[Session],
    create_job: Callable[..., Job],
    open_stream: Reader,
    stream_app: Flask,
    alice: dict[str, str],
) -> None:
    job_id = _running(sessions, create_job)
    _report(sessions, job_id, logs=["epoch 1"], points=[("loss", 1, 0.9)], progress=(0.5, "half"))
    stream = open_stream(job_id, alice)
    first = stream.take(3)
    assert [e["type"] for e in first] == ["log", "metric", "state"]
    assert first[0]["message"] == "epoch 1"
    assert (first[1]["name"], first[1]["step"], first[1]["value"]) == ("loss", 1, 0.9)
    assert first[2]["state"] == "running"
    assert (first[2]["progress"], first[2]["message"]) == (0.5, "half")

    _report(sessions, job_id, points=[("loss", 2, 0.5)], progress=(0.75, "most"))
    later = stream.take(2)
    assert [(e["type"], e.get("step")) for e in later] == [("metric", 2), ("progress", None)]
    assert later[1]["progress"] == 0.75

    _succeed(sessions, job_id, "done")
    final = stream.rest()
    assert [e["type"] for e in final] == ["log", "state"]
    assert final[-1]["state"] == "succeeded"
    assert stream.ended

    # A log event reads exactly as the same line from /events.
    page = stream_app.test_client().get(f"/api/v1/jobs/{job_id}/events", headers=alice)
    lines = [{"type": "log", **line} for line in page.get_json()["events"]]
    streamed = [{k: v for k, v in e.items() if k != "event_id"} for e in first + final]
    assert [e for e in streamed if e["type"] == "log"] == lines


def test_a_dropped_stream_resumed_with_last_event_id_gets_exactly_the_missed_events(
    sessions: sessionmaker[Session],
    create_job: Callable[..., Job],
    open_stream: Reader,
    alice: dict[str, str],
) -> None:
    job_id = _running(sessions, create_job)
    _report(sessions, job_id, logs=["a", "b"], points=[("loss", 1, 1.0)], progress=(0.1, "1"))
    first = open_stream(job_id, alice)
    seen = first.take(2)  # a and b; the metric and the state are still owed
    first.close()  # the connection drops

    # Missed while disconnected: more of every kind, and a re-reported step (an upsert
    # keeps its id: not a new event).
    _report(sessions, job_id, logs=["c"], points=[("loss", 2, 0.5), ("acc", 2, 0.7)])
    _report(sessions, job_id, points=[("loss", 1, 1.0)], progress=(0.6, "6"))
    second = open_stream(job_id, alice | {"Last-Event-ID": seen[-1]["event_id"]})
    resumed = second.take(5)
    _succeed(sessions, job_id, "end")
    resumed += second.rest()

    logs = [e["message"] for e in seen + resumed if e["type"] == "log"]
    assert logs == ["a", "b", "c", "end"]
    points = [(e["name"], e["step"]) for e in seen + resumed if e["type"] == "metric"]
    assert sorted(points) == [("acc", 2), ("loss", 1), ("loss", 2)]
    states = [(e["state"], e["message"]) for e in resumed if e["type"] == "state"]
    assert states[0] == ("running", "6")
    assert [state for state, _ in states] == ["running", "succeeded"]
    assert second.ended

    # Resuming from the final event owes nothing: the stream ends at once, empty.
    third = open_stream(job_id, alice | {"Last-Event-ID": resumed[-1]["event_id"]})
    assert third.rest() == []


def test_after_resumes_like_last_event_id_and_accepts_the_events_cursor(
    sessions: sessionmaker[Session],
    create_job: Callable[..., Job],
    open_stream: Reader,
    alice: dict[str, str],
) -> None:
    job_id = _running(sessions, create_job)
    _report(sessions, job_id, logs=["a", "b", "c"], points=[("loss", 1, 1.0)])
    _succeed(sessions, job_id, "d")
    everything = open_stream(job_id, alice).rest()
    assert [e["type"] for e in everything] == ["log"] * 3 + ["metric", "log", "state"]
    second_log, metric = everything[1], everything[3]

    by_id = open_stream(job_id, alice, after=metric["event_id"]).rest()
    assert [(e["type"], e.get("message", e.get("state"))) for e in by_id if e["type"] == "log"] == [
        ("log", "d")
    ]
    assert [e["type"] for e in by_id] == ["log", "state"]

    # A plain integer is the /events cursor: later lines, every metric point, the state.
    by_line = open_stream(job_id, alice, after=str(second_log["id"])).rest()
    assert [e.get("message") for e in by_line if e["type"] == "log"] == ["c", "d"]
    assert [e["type"] for e in by_line].count("metric") == 1
    assert by_line[-1]["state"] == "succeeded"


def test_a_stream_is_the_owners_and_a_bad_cursor_is_a_400(
    stream_app: Flask,
    create_job: Callable[..., Job],
    alice: dict[str, str],
    bob: dict[str, str],
) -> None:
    job = create_job(owner="alice")
    client = stream_app.test_client()
    url = f"/api/v1/jobs/{job.id}/stream"
    assert client.get(url).status_code == 401
    mine_not = client.get(url, headers=bob)
    assert mine_not.status_code == 404
    assert mine_not.get_json()["code"] == "not_found"
    bad = client.get(url, headers=alice | {"Last-Event-ID": "12.x"})
    assert bad.status_code == 400
    assert bad.get_json()["code"] == "invalid_request"


def test_a_key_past_its_stream_limit_gets_429_until_one_closes(
    create_job: Callable[..., Job],
    open_stream: Reader,
    stream_app: Flask,
    alice: dict[str, str],
    bob: dict[str, str],
) -> None:
    job = create_job(owner="alice")
    first, second = open_stream(job.id, alice), open_stream(job.id, alice)
    first.next()
    second.next()
    client = stream_app.test_client()
    refused = client.get(f"/api/v1/jobs/{job.id}/stream", headers=alice)
    assert refused.status_code == 429
    assert refused.get_json()["code"] == "too_many_streams"
    assert int(refused.headers["Retry-After"]) > 0
    other = create_job(owner="bob")
    open_stream(other.id, bob).next()  # another key has its own limit
    first.close()
    open_stream(job.id, alice).next()


def test_a_stream_of_an_idle_job_sends_keep_alive_comments(
    create_job: Callable[..., Job], stream_app: Flask, alice: dict[str, str]
) -> None:
    job = create_job(owner="alice")
    response = stream_app.test_client().get(
        f"/api/v1/jobs/{job.id}/stream", headers=alice, buffered=False
    )
    chunks = iter(response.response)  # type: ignore[arg-type]
    received = b""
    while b": keep-alive" not in received:
        received += next(chunks)
    response.close()
    assert b"event: state" in received


def test_the_ui_follows_an_unfinished_jobs_stream_on_its_session(
    stream_app: Flask,
    create_job: Callable[..., Job],
    create_key: Callable[..., str],
) -> None:
    from tests.unit.test_ui import _sign_in

    client = stream_app.test_client()
    _sign_in(client, create_key("alice"))
    running, done = create_job(state=JobState.RUNNING), create_job(state=JobState.SUCCEEDED)
    page = client.get(f"/jobs/{running.id}").text
    assert f'data-url="/jobs/{running.id}/stream"' in page
    assert "kiln-stream.js" in page
    assert 'data-url="/jobs/' + done.id + '/stream"' not in client.get(f"/jobs/{done.id}").text
    listing = client.get("/jobs").text
    assert f'data-stream="/jobs/{running.id}/stream"' in listing
    assert f'data-stream="/jobs/{done.id}/stream"' not in listing

    response = client.get(f"/jobs/{running.id}/stream", buffered=False)
    assert response.mimetype == "text/event-stream"
    stream = Stream(response)
    first = stream.take(1)[0]
    stream.close()
    assert (first["type"], first["state"]) == ("state", "running")


def test_a_web_process_with_no_stream_threads_answers_503_and_keeps_no_lease(
    make_app: Callable[..., Flask], create_job: Callable[..., Job], alice: dict[str, str]
) -> None:
    app = make_app(stream_threads=0, streams_per_key=1)
    job = create_job(owner="alice")
    for _ in range(2):  # the refusal gave the key's one lease back
        busy = app.test_client().get(f"/api/v1/jobs/{job.id}/stream", headers=alice)
        assert busy.status_code == 503
        assert busy.get_json()["code"] == "streams_busy"
        assert int(busy.headers["Retry-After"]) > 0
