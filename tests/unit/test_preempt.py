"""Preemption: who is asked to make way (choose), the opt-out, the no-starvation cap,
one victim per waiting job even with two deciders at once (on SQLite and PostgreSQL),
and the victim's side: it stops at its next step and re-queues without spending an
attempt."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pyarrow.csv as pacsv
import pytest
from modelkit import add_dataset, feature_table, never_resent, register_model
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db import preemption as rows
from db.base import utcnow
from db.models import Job, JobEvent
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from workers import execute, preempt
from workers.preempt import Preemption, choose, why_waiting
from workers.runners import batch
from workers.runtime import Runtime

T0 = datetime(2026, 12, 3, 12, 0)


@dataclass
class Running:
    id: str
    priority: int = 0
    queue: str = "cpu"
    device: str | None = "cpu"
    preemptible: bool = True
    preemptions: int = 0
    preempt_for: str | None = None
    cancel_requested: bool = False
    started_at: datetime | None = T0


@dataclass
class Waiting:
    id: str
    priority: int = 9
    queue: str = "cpu"


def test_the_lowest_priority_running_job_makes_way() -> None:
    running = [Running("a", priority=3), Running("b", priority=1), Running("c", priority=2)]

    assert choose([Waiting("w", priority=5)], running, 3) == [Preemption("b", "w")]


def test_among_equals_the_most_recently_started_makes_way() -> None:
    running = [Running("old", started_at=T0), Running("new", started_at=T0 + timedelta(1))]

    assert choose([Waiting("w")], running, 3) == [Preemption("new", "w")]


def test_no_job_is_preempted_for_one_of_equal_or_lower_priority() -> None:
    assert choose([Waiting("w", priority=4)], [Running("a", priority=4)], 3) == []


def test_a_job_that_opted_out_is_never_preempted() -> None:
    running = [Running("keep", preemptible=False), Running("other", priority=5)]

    assert choose([Waiting("w", priority=6)], running, 3) == [Preemption("other", "w")]
    assert choose([Waiting("w")], [Running("keep", preemptible=False)], 3) == []


def test_a_job_preempted_n_times_is_not_preempted_again() -> None:
    assert choose([Waiting("w")], [Running("a", preemptions=3)], 3) == []
    assert choose([Waiting("w")], [Running("a", preemptions=2)], 3) == [Preemption("a", "w")]


def test_a_waiting_job_already_made_way_for_gets_no_second_victim() -> None:
    running = [Running("a", preempt_for="w"), Running("b")]

    assert choose([Waiting("w")], running, 3) == []


def test_each_waiting_job_gets_its_own_victim_most_urgent_first() -> None:
    running = [Running("a", priority=0), Running("b", priority=1)]
    waiting = [Waiting("w5", priority=5), Waiting("w9", priority=9), Waiting("w2", priority=2)]

    assert choose(waiting, running, 3) == [Preemption("a", "w9"), Preemption("b", "w5")]


@pytest.mark.parametrize(("victim", "waiting", "preempted"), [
    (Running("a", queue="cpu", device="cpu"), Waiting("w", queue="gpu"), False),
    (Running("a", queue="cpu", device="cuda"), Waiting("w", queue="gpu"), True),
    (Running("a", queue="gpu", device="cuda"), Waiting("w", queue="cpu"), True),
    (Running("a", queue="gpu", device="cuda"), Waiting("w", queue="gpu.x2"), False),
    (Running("a", queue="gpu.x2", device="cuda"), Waiting("w", queue="gpu.x2"), True),
    (Running("a", queue="interactive.cpu"), Waiting("w", queue="cpu"), False),
])  # fmt: skip
def test_only_a_job_whose_worker_serves_the_waiting_queue_makes_way(
    victim: Running, waiting: Waiting, preempted: bool
) -> None:
    assert bool(choose([waiting], [victim], 3)) == preempted


def test_a_waiting_job_says_why_it_waits() -> None:
    waiting = Waiting("w", priority=5)

    assert "equal or higher priority" in why_waiting(waiting, [Running("a", priority=7)], 3)
    assert "may not be preempted" in why_waiting(waiting, [Running("a", preemptions=3)], 3)
    assert "gpu queue" in why_waiting(Waiting("g", queue="gpu"), [Running("a")], 3)


# The database side ------------------------------------------------------------------


def _set(sessions: sessionmaker[Session], job_id: str, **values: Any) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def _waiting(sessions, create_job, priority: int = 9, sent_ago_s: float = 60) -> str:
    job = create_job(priority=priority)
    _set(sessions, job.id, sent_at=utcnow() - timedelta(seconds=sent_ago_s))
    return job.id


def _row(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        row = session.get(Job, job_id)
        assert row is not None
        session.expunge(row)
        return row


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"preempt_after_s": 5.0, "max_preemptions": 3})


def test_sweep_asks_the_victim_once_and_says_so_on_both_jobs(sessions, create_job, fast) -> None:
    victim = create_job(state="running", priority=1).id
    waiting = _waiting(sessions, create_job, priority=8)

    made = preempt.sweep(sessions, fast)
    again = preempt.sweep(sessions, fast)

    assert made == [Preemption(victim, waiting)]
    assert again == []
    assert _row(sessions, victim).preempt_for == waiting
    assert f"job {victim} is making way" in _row(sessions, waiting).message
    with sessions() as session:
        events = session.scalars(select(JobEvent.message).where(JobEvent.job_id == victim)).all()
    assert any(f"for job {waiting}" in e for e in events), events


def test_a_job_that_just_arrived_is_given_time_to_find_a_free_worker(
    sessions, create_job, fast
) -> None:
    create_job(state="running", priority=1)
    waiting = _waiting(sessions, create_job, priority=8, sent_ago_s=1)

    assert preempt.sweep(sessions, fast) == []
    assert _row(sessions, waiting).message == "queued"


def test_a_waiting_job_with_no_fair_victim_says_why(sessions, create_job, fast) -> None:
    victim = create_job(state="running", priority=1).id
    _set(sessions, victim, preemptible=False)
    waiting = _waiting(sessions, create_job, priority=8)

    assert preempt.sweep(sessions, fast) == []
    assert "may not be preempted" in _row(sessions, waiting).message


def test_a_request_is_released_once_the_waiting_job_no_longer_waits(
    sessions, create_job, fast
) -> None:
    victim = create_job(state="running", priority=1).id
    waiting = _waiting(sessions, create_job, priority=8)
    preempt.sweep(sessions, fast)
    with sessions() as session:  # another worker freed up and took it meanwhile
        assert jobs.claim(session, waiting, 0, "w2", "cpu") == 1
        session.commit()

    preempt.sweep(sessions, fast)

    assert _row(sessions, victim).preempt_for is None  # it carries on


def test_two_deciders_at_once_preempt_one_victim_for_one_waiting_job(
    sessions, create_job, fast
) -> None:
    first, second = create_job(state="running").id, create_job(state="running").id
    waiting = _waiting(sessions, create_job)
    # Both read before either writes: each picked a different victim for the same job.
    start, results = threading.Barrier(2), {}

    def decide(victim: str) -> None:
        with sessions() as session:
            start.wait()
            results[victim] = rows.ask_to_stop(session, victim, waiting, 3)
            session.commit()

    threads = [threading.Thread(target=decide, args=(v,)) for v in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(results.values()) == [False, True]
    named = [_row(sessions, v).preempt_for for v in (first, second)]
    assert sorted(named, key=lambda n: n or "") == [None, waiting]


def test_the_same_victim_is_never_asked_twice(sessions, create_job) -> None:
    victim = create_job(state="running").id
    one, two = create_job().id, create_job().id

    with sessions() as session:
        assert rows.ask_to_stop(session, victim, one, 3)
        assert not rows.ask_to_stop(session, victim, two, 3)
        session.commit()

    assert _row(sessions, victim).preempt_for == one


@pytest.fixture
def run_attempt(settings: Settings, sessions):
    """run_attempt(job, runner) -> the row after one attempt with `runner` as echo's."""
    runtime = Runtime(
        settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir)
    )
    sent: list[tuple[str, int]] = []

    def attempt(job: Job, runner: Any, monkeypatch: pytest.MonkeyPatch) -> Job:
        monkeypatch.setitem(execute.RUNNERS, "echo", runner)
        execute.execute_attempt(
            runtime, job.id, job.attempt, "w1", lambda j, _: sent.append((j.id, j.attempt))
        )
        return _row(sessions, job.id)

    attempt.sent = sent  # type: ignore[attr-defined]
    return attempt


def test_a_preempted_attempt_requeues_without_spending_an_attempt(
    sessions, create_job, run_attempt, monkeypatch
) -> None:
    job = create_job()
    waiting = create_job(priority=9).id
    steps: list[int] = []

    def runner(spec: Any, ctx: Any) -> dict:
        for step in range(1000):
            if step == 3:  # the scheduler decides while the job runs
                with sessions() as session:
                    assert rows.ask_to_stop(session, job.id, waiting, 3)
                    session.commit()
            ctx.progress(step / 1000, f"step {step}", force=True)
            ctx.raise_if_cancelled()
            steps.append(step)
        return {}

    row = run_attempt(job, runner, monkeypatch)

    assert steps == [0, 1, 2]  # stopped at the first step after it was asked
    assert (row.state, row.attempt, row.charged_attempts) == ("queued", 1, 0)
    assert (row.preemptions, row.preempt_for) == (1, None)
    assert row.message.startswith(f"re-queued: preempted by job {waiting}")
    assert run_attempt.sent == [(job.id, 1)]  # its message went out again at once


def test_a_submission_opts_out_beside_its_priority(client, alice) -> None:
    spec = {"model_name": "m", "dataset": "builtin:iris"}
    body = {"kind": "train", "spec": spec, "priority": 2, "preemptible": False}

    job = client.post("/api/v1/jobs", json=body, headers=alice).get_json()
    default = client.post("/api/v1/jobs", json={**body, "preemptible": True}, headers=alice)

    assert (job["preemptible"], job["preemptions"], job["priority"]) == (False, 0, 2)
    assert default.get_json()["preemptible"] is True


def test_a_victim_that_finished_first_frees_the_waiting_job_for_another(
    sessions, create_job, fast
) -> None:
    first = create_job(state="running", priority=1).id
    waiting = _waiting(sessions, create_job, priority=8)
    assert preempt.sweep(sessions, fast) == [Preemption(first, waiting)]
    with sessions() as session:  # it succeeded before its next step
        assert jobs.succeed(session, first, 1, {})
        session.commit()
    second = create_job(state="running", priority=2).id

    made = preempt.sweep(sessions, fast)

    assert _row(sessions, first).preempt_for is None
    assert made == [Preemption(second, waiting)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_preempted_batch_job_keeps_its_committed_chunks_and_resumes_after_them(
    settings, sessions, create_job, tmp_path, monkeypatch
) -> None:
    runtime = Runtime(
        settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir)
    )
    register_model(sessions, runtime.store, tmp_path)
    pacsv.write_csv(feature_table(60), tmp_path / "in.csv")
    dataset = add_dataset(sessions, runtime.store, tmp_path / "in.csv", "csv")
    with sessions() as session:
        spec = {"model": "m", "dataset": dataset, "chunk_rows": 10}
        job_id = jobs.create(
            session, kind="batch_predict", owner="alice", spec=spec, queue="cpu"
        ).id
        session.commit()
    waiting = create_job(priority=9).id
    monkeypatch.setattr("workers.context._THROTTLE_S", 0.0)
    scored: list[int] = []
    real_score = batch._score

    def score_and_get_preempted(model, features, batch_size, device):
        scored.append(len(features))
        if len(scored) == 2:
            with sessions() as session:
                assert rows.ask_to_stop(session, job_id, waiting, 3)
                session.commit()
        return real_score(model, features, batch_size, device)

    monkeypatch.setattr(batch, "_score", score_and_get_preempted)
    execute.execute_attempt(runtime, job_id, 0, "w1", never_resent)
    stopped = _row(sessions, job_id)
    execute.execute_attempt(runtime, job_id, 1, "w1", never_resent)
    done = _row(sessions, job_id)

    assert (stopped.state, stopped.preemptions, stopped.charged_attempts) == ("queued", 1, 0)
    assert done.state == "succeeded", done.error_message
    assert len(scored) == 2 + 4  # chunks 1-2 committed before it stopped; 3-6 after
    assert done.result["rows"] == 60
