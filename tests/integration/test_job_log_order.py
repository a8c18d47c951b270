"""A job's log lines become visible in id order, whoever writes them: on PostgreSQL a line's
id is taken at insert but seen at commit, so a reader's cursor (a stream's, `/events?after=`)
that passed a later line committed first would never show the earlier one. A second writer
of the same job's log waits for the first writer's transaction instead."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select, text

from db import jobs
from db.models import JobEvent

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_second_writer_of_a_jobs_log_waits_for_the_first_to_commit(sessions, wait_until):
    with sessions() as session:
        job_id = jobs.create(session, kind="echo", owner="alice", spec={}, queue="cpu").id
        session.commit()
    first = sessions()  # a worker, say, mid-transaction: its line's id is taken
    jobs.log(first, job_id, "first")
    first_pid = first.execute(text("SELECT pg_backend_pid()")).scalar_one()
    second_committed = threading.Event()

    def second_writer() -> None:  # the reconciler, say, on the same job
        with sessions() as session:
            jobs.log(session, job_id, "second")
            session.commit()
        second_committed.set()

    def blocked_by_first() -> bool:
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
        with sessions() as session:
            return bool(session.execute(text(waiting), {"pid": first_pid}).scalar_one())

    writer = threading.Thread(target=second_writer)
    writer.start()
    try:
        wait_until(
            lambda: second_committed.is_set() or blocked_by_first(),
            "the second writer to commit or to wait for the first",
        )
        assert not second_committed.is_set(), "a later line became visible before an earlier one"
    finally:
        first.commit()
        first.close()
        writer.join()
    assert second_committed.is_set()
    with sessions() as session:
        lines = session.scalars(
            select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        )
        assert list(lines) == ["first", "second"]
