"""db.jobs transitions on SQLite: every write is a compare-and-set that names its attempt.

The examples pin single rules; the Hypothesis state machine drives random sequences of
submit, claim, heartbeat, cancel, crash (the reconciler's sweep) and finish, and checks the
invariants after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, event, select, true, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.base import utcnow
from db.engine import make_engine, make_sessionmaker
from db.models import Job, JobEvent
from kiln.errors import IllegalTransition
from kiln.settings import Settings
from kiln.states import TERMINAL_STATES, TRANSITIONS, JobState
from workers.reconcile import reconcile

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

TERMINAL = sorted(TERMINAL_STATES)


def _row(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _write(sessions: sessionmaker[Session], change: Callable[[Session], Any]) -> Any:
    """Run one transition in its own committed transaction, as web and workers do."""
    with sessions.begin() as session:
        return change(session)


def test_a_queued_job_is_claimed_once(
    sessions: sessionmaker[Session], create_job: Callable[..., Job]
) -> None:
    job = create_job()

    first = _write(sessions, lambda s: jobs.claim(s, job.id, 0, "w1", "cpu"))
    second = _write(sessions, lambda s: jobs.claim(s, job.id, 0, "w2", "cpu"))

    assert (first, second) == (1, None)
    row = _row(sessions, job.id)
    assert (row.state, row.attempt, row.worker) == (JobState.RUNNING, 1, "w1")


@pytest.mark.parametrize("queued_attempt", [1, -1])
def test_a_claim_with_another_attempt_number_is_rejected(
    sessions: sessionmaker[Session], create_job: Callable[..., Job], queued_attempt: int
) -> None:
    job = create_job()

    assert _write(sessions, lambda s: jobs.claim(s, job.id, queued_attempt, "w1", "cpu")) is None
    row = _row(sessions, job.id)
    assert (row.state, row.attempt, row.started_at) == (JobState.QUEUED, 0, None)


def test_writes_of_an_attempt_that_was_requeued_are_rejected(
    sessions: sessionmaker[Session], create_job: Callable[..., Job]
) -> None:
    job = create_job(state=JobState.RUNNING)  # claimed once: attempt 1
    assert _write(sessions, lambda s: jobs.requeue(s, job.id, 1, "worker lost"))
    stale_writes: dict[str, Callable[[Session], bool]] = {
        "heartbeat": lambda s: jobs.heartbeat(s, job.id, 1),
        "progress": lambda s: jobs.report_progress(s, job.id, 1, 0.5, "half") is not None,
        "succeed": lambda s: jobs.succeed(s, job.id, 1, {"late": True}),
        "fail": lambda s: jobs.fail(s, job.id, 1, "RuntimeError", "late"),
        "cancelled": lambda s: jobs.mark_cancelled(s, job.id, 1),
        "requeue": lambda s: jobs.requeue(s, job.id, 1, "again"),
    }

    assert {name: _write(sessions, w) for name, w in stale_writes.items()} == dict.fromkeys(
        stale_writes, False
    )
    assert _write(sessions, lambda s: jobs.claim(s, job.id, 1, "w2", "cpu")) == 2
    # The new attempt holds the job; the old one still cannot write.
    assert {name: _write(sessions, w) for name, w in stale_writes.items()} == dict.fromkeys(
        stale_writes, False
    )
    assert _write(sessions, lambda s: jobs.succeed(s, job.id, 2, {"ok": True}))
    row = _row(sessions, job.id)
    assert (row.state, row.attempt, row.worker, row.result) == (
        JobState.SUCCEEDED,
        2,
        "w2",
        {"ok": True},
    )


@pytest.mark.parametrize("state", TERMINAL)
def test_terminal_states_never_change(
    sessions: sessionmaker[Session], create_job: Callable[..., Job], state: JobState
) -> None:
    job = create_job(state=state)
    before = _row(sessions, job.id)
    writes: list[Callable[[Session], object]] = [
        lambda s: jobs.claim(s, job.id, before.attempt, "w9", "cpu"),
        *(
            write
            for attempt in (0, 1, 2)
            for write in (
                lambda s, a=attempt: jobs.heartbeat(s, job.id, a),
                lambda s, a=attempt: jobs.report_progress(s, job.id, a, 0.1, "x") is not None,
                lambda s, a=attempt: jobs.succeed(s, job.id, a, {}),
                lambda s, a=attempt: jobs.fail(s, job.id, a, "RuntimeError", "x"),
                lambda s, a=attempt: jobs.mark_cancelled(s, job.id, a),
                lambda s, a=attempt: jobs.requeue(s, job.id, a, "x"),
            )
        ),
        lambda s: jobs.fail(s, job.id, None, "InvalidSpec", "x"),
    ]

    results = [_write(sessions, write) for write in writes]

    assert not any(results)
    after = _row(sessions, job.id)
    assert (after.state, after.attempt, after.finished_at, after.result, after.error) == (
        before.state,
        before.attempt,
        before.finished_at,
        before.result,
        before.error,
    )


@pytest.mark.parametrize("state", [*TERMINAL, JobState.QUEUED])
def test_no_move_outside_the_transition_table_wins_even_with_a_loose_condition(
    sessions: sessionmaker[Session], create_job: Callable[..., Job], state: JobState
) -> None:
    job = create_job(state=state)
    illegal = [t for t in JobState if t not in TRANSITIONS[state]]

    # A `where` that holds for any row: only the table stands between the job and the move.
    won = [_write(sessions, lambda s, t=t: jobs._cas(s, job.id, true(), state=t)) for t in illegal]

    assert won == [False] * len(illegal)
    assert _row(sessions, job.id).state == state


@pytest.mark.parametrize("state", TERMINAL)
def test_cancelling_a_finished_job_is_an_illegal_transition(
    sessions: sessionmaker[Session], create_job: Callable[..., Job], state: JobState
) -> None:
    job = create_job(state=state)

    with sessions() as session, pytest.raises(IllegalTransition, match=f"already {state}"):
        jobs.request_cancel(session, session.get(Job, job.id))  # type: ignore[arg-type]


def test_cancelling_a_queued_job_cancels_it_at_once(
    sessions: sessionmaker[Session], create_job: Callable[..., Job]
) -> None:
    job = create_job()

    _write(sessions, lambda s: jobs.request_cancel(s, s.get(Job, job.id)))

    row = _row(sessions, job.id)
    assert (row.state, row.started_at) == (JobState.CANCELLED, None)
    assert row.finished_at is not None
    assert _write(sessions, lambda s: jobs.claim(s, job.id, 0, "w1", "cpu")) is None


def test_cancelling_a_running_job_asks_its_attempt_to_stop(
    sessions: sessionmaker[Session], create_job: Callable[..., Job]
) -> None:
    job = create_job(state=JobState.RUNNING)

    _write(sessions, lambda s: jobs.request_cancel(s, s.get(Job, job.id)))

    row = _row(sessions, job.id)
    assert (row.state, row.cancel_requested) == (JobState.RUNNING, True)
    assert _write(sessions, lambda s: jobs.is_cancel_requested(s, job.id))
    # A running attempt's progress report reads the flag in the same statement.
    assert _write(sessions, lambda s: jobs.report_progress(s, job.id, 1, 0.5, "half")) is True
    assert _write(sessions, lambda s: jobs.mark_cancelled(s, job.id, 1))
    assert _row(sessions, job.id).state == JobState.CANCELLED


def test_a_lost_job_whose_cancel_was_requested_is_cancelled_not_requeued(
    sessions: sessionmaker[Session], create_job: Callable[..., Job], tmp_path: Path
) -> None:
    # Re-queued with its cancel flag set, no claim would ever take it: stuck forever.
    job = create_job(state=JobState.RUNNING)
    _write(sessions, lambda s: jobs.request_cancel(s, s.get(Job, job.id)))
    assert not _write(sessions, lambda s: jobs.requeue(s, job.id, 1, "worker lost"))
    _write(sessions, lambda s: _backdate_heartbeat(s, job.id))
    sent: list[Job] = []

    report = reconcile(sessions, _settings(tmp_path), lambda j, _=0.0: sent.append(j), lambda _q: 0)

    assert (report.cancelled, report.requeued, report.failed, sent) == (1, 0, 0, [])
    row = _row(sessions, job.id)
    assert (row.state, row.attempt) == (JobState.CANCELLED, 1)
    assert row.finished_at is not None


def _settings(tmp_path: Path) -> Settings:
    # A long heartbeat timeout: only heartbeats a test backdates on purpose look stale.
    return Settings(
        data_dir=tmp_path / "data",
        redis_url="memory://",
        heartbeat_timeout_s=3600,
        max_attempts=3,
    )


def _backdate_heartbeat(session: Session, job_id: str) -> None:
    """Make the job's last heartbeat look like its worker died two hours ago."""
    session.execute(
        update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=2))
    )


# --- the state machine -------------------------------------------------------------------

#: How far a message's or writer's attempt number is from the job's: 0 is current, others stale.
OFFSETS = st.sampled_from([0, 0, 0, -1, 1])
WORKERS = st.sampled_from(["w1", "w2"])
#: Few jobs per run, so that runs go deep (claim, cancel, crash, claim again...) on each.
MAX_JOBS = 3
LIVE = (JobState.QUEUED, JobState.RUNNING)


@dataclass
class Expected:
    """What the database must say about one job, computed independently of db.jobs."""

    state: JobState = JobState.QUEUED
    attempt: int = 0
    cancel_requested: bool = False
    #: (attempt, worker) of every claim that won, in order.
    claims: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Seen:
    state: str
    attempt: int
    finished_at: datetime | None


def _has(*states: JobState) -> Callable[[JobLifecycle], bool]:
    """Precondition: some job is in one of `states`."""
    return lambda machine: bool(machine.ids_in(states))


class JobLifecycle(RuleBasedStateMachine):
    """What users, workers and the reconciler do to jobs, in any order.

    Each rule draws a job in the states it is meant for (a crash needs a running job), and
    messages and writers carry the current attempt number or a stale one.
    """

    def __init__(self, sessions: sessionmaker[Session], config: Settings) -> None:
        super().__init__()
        self.sessions = sessions
        self.config = config
        self.expected: dict[str, Expected] = {}
        self.seen: dict[str, Seen] = {}
        self.sent: list[tuple[str, int]] = []

    def ids_in(self, states: tuple[JobState, ...]) -> list[str]:
        return [job_id for job_id, want in self.expected.items() if want.state in states]

    def _pick(self, data: st.DataObject, *states: JobState) -> tuple[str, Expected]:
        job_id = data.draw(st.sampled_from(self.ids_in(states or tuple(JobState))), "job")
        return job_id, self.expected[job_id]

    def _write(self, change: Callable[[Session], Any]) -> Any:
        return _write(self.sessions, change)

    @precondition(lambda self: len(self.expected) < MAX_JOBS)
    @rule()
    def submit(self) -> None:
        job_id = self._write(
            lambda s: jobs.create(s, kind="echo", owner="alice", spec={}, queue="cpu").id
        )
        self.expected[job_id] = Expected()

    @precondition(_has(*JobState))
    @rule(data=st.data(), offset=OFFSETS, worker=WORKERS)
    def claim(self, data: st.DataObject, offset: int, worker: str) -> None:
        """A message for the job reaches a worker (possibly stale, possibly a duplicate)."""
        job_id, want = self._pick(data)
        got = self._write(lambda s: jobs.claim(s, job_id, want.attempt + offset, worker, "cpu"))
        wins = want.state is JobState.QUEUED and offset == 0 and not want.cancel_requested
        assert got == (want.attempt + 1 if wins else None)
        if wins:
            want.state, want.attempt = JobState.RUNNING, want.attempt + 1
            want.claims.append((want.attempt, worker))

    @precondition(_has(*JobState))
    @rule(data=st.data(), offset=OFFSETS, with_progress=st.booleans())
    def heartbeat(self, data: st.DataObject, offset: int, with_progress: bool) -> None:
        job_id, want = self._pick(data)
        attempt = want.attempt + offset
        if with_progress:
            report = self._write(lambda s: jobs.report_progress(s, job_id, attempt, 0.5, "half"))
            held = report is not None
            if held:  # the same statement reads the cancel flag
                assert report == want.cancel_requested
        else:
            held = self._write(lambda s: jobs.heartbeat(s, job_id, attempt))
        assert held == (want.state is JobState.RUNNING and offset == 0)

    @precondition(_has(*LIVE))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id, want = self._pick(data, *LIVE)
        self._write(lambda s: jobs.request_cancel(s, s.get(Job, job_id)))
        want.cancel_requested = True
        if want.state is JobState.QUEUED:
            want.state = JobState.CANCELLED

    @precondition(_has(*TERMINAL_STATES))
    @rule(data=st.data())
    def cancel_finished(self, data: st.DataObject) -> None:
        job_id, _ = self._pick(data, *TERMINAL_STATES)
        with pytest.raises(IllegalTransition):
            self._write(lambda s: jobs.request_cancel(s, s.get(Job, job_id)))

    @precondition(_has(JobState.RUNNING))
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """A running job's worker dies: its heartbeat goes stale and the reconciler sweeps."""
        job_id, want = self._pick(data, JobState.RUNNING)
        self._write(lambda s: _backdate_heartbeat(s, job_id))
        report = reconcile(
            self.sessions,
            self.config,
            lambda job, _=0.0: self.sent.append((job.id, job.attempt)),
            lambda _queue: 1,
        )
        if want.cancel_requested:
            assert (report.cancelled, report.requeued) == (1, 0), "re-queued a cancelled job"
            want.state = JobState.CANCELLED
        elif want.attempt < self.config.max_attempts:
            assert report.requeued == 1
            assert self.sent[-1] == (job_id, want.attempt)
            want.state = JobState.QUEUED
        else:
            assert report.failed == 1
            want.state = JobState.FAILED

    @precondition(_has(*JobState))
    @rule(
        data=st.data(),
        offset=OFFSETS,
        outcome=st.sampled_from([JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]),
    )
    def finish(self, data: st.DataObject, offset: int, outcome: JobState) -> None:
        """The attempt that holds the job (or a stale one) records how it ended."""
        job_id, want = self._pick(data)
        attempt = want.attempt + offset
        finishes: dict[JobState, Callable[[Session], bool]] = {
            JobState.SUCCEEDED: lambda s: jobs.succeed(s, job_id, attempt, {"ok": True}),
            JobState.FAILED: lambda s: jobs.fail(s, job_id, attempt, "RuntimeError", "boom"),
            JobState.CANCELLED: lambda s: jobs.mark_cancelled(s, job_id, attempt),
        }
        won = self._write(finishes[outcome])
        assert won == (want.state is JobState.RUNNING and offset == 0)
        if won:
            want.state = outcome

    @precondition(_has(JobState.QUEUED))
    @rule(data=st.data())
    def fail_before_running(self, data: st.DataObject) -> None:
        """A worker finds the stored spec invalid and fails the job without claiming it."""
        job_id, want = self._pick(data, JobState.QUEUED)
        assert self._write(lambda s: jobs.fail(s, job_id, None, "InvalidSpec", "bad spec"))
        want.state = JobState.FAILED

    @invariant()
    def invariants_hold(self) -> None:
        with self.sessions() as session:
            rows = session.scalars(select(Job).where(Job.id.in_(self.expected)))
            for job in rows:
                want = self.expected[job.id]
                assert (job.state, job.attempt, job.cancel_requested) == (
                    want.state,
                    want.attempt,
                    want.cancel_requested,
                ), "the database and the model disagree"
                self._terminal_states_never_change_and_attempts_only_grow(job)
                self._at_most_one_attempt_holds_the_job(job, want)
                self._no_job_is_stranded(job)

    def _terminal_states_never_change_and_attempts_only_grow(self, job: Job) -> None:
        before = self.seen.get(job.id)
        if before is not None:
            assert job.attempt >= before.attempt
            if JobState(before.state).is_terminal:
                assert (job.state, job.finished_at) == (before.state, before.finished_at)
        self.seen[job.id] = Seen(job.state, job.attempt, job.finished_at)

    @staticmethod
    def _at_most_one_attempt_holds_the_job(job: Job, want: Expected) -> None:
        # No attempt number was won twice: a job never runs twice at once.
        assert len({attempt for attempt, _ in want.claims}) == len(want.claims)
        if job.state == JobState.RUNNING:
            assert (job.attempt, job.worker) == want.claims[-1]

    @staticmethod
    def _no_job_is_stranded(job: Job) -> None:
        if job.state == JobState.QUEUED:
            assert not job.cancel_requested, "a queued job that no claim can ever take"
        if JobState(job.state).is_terminal:
            assert job.finished_at is not None

    def teardown(self) -> None:
        # Each example starts from an empty table, so the sweep sees only its own jobs.
        self._write(lambda s: (s.execute(delete(JobEvent)), s.execute(delete(Job))))


def test_job_state_machine_invariants_hold_for_any_sequence(
    database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    # Durability is not under test: no fsync per commit keeps thousands of steps quick.
    event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA synchronous=OFF"))
    sessions, config = make_sessionmaker(engine), _settings(tmp_path)
    try:
        run_state_machine_as_test(
            lambda: JobLifecycle(sessions, config),
            settings=settings(
                max_examples=100,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
                # No explain phase: it traces every line, which makes shrinking a failure
                # through SQLAlchemy take minutes instead of seconds.
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
            ),
        )
    finally:
        engine.dispose()
