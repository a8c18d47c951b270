"""A job's life through real processes: submit over HTTP, Redis, a Celery worker, the database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from db.models import Job
from kiln import routing
from kiln.broker import send_run

pytestmark = pytest.mark.integration
#: Behaviour that does not depend on the database runs on SQLite only, to keep the suite short.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def test_echo_job_goes_from_queued_through_running_to_succeeded_with_its_result(
    api: Any, worker: Any
) -> None:
    submitted = api.submit("echo", {"message": "hello", "sleep_s": 1.5})
    assert (submitted["state"], submitted["attempt"]) == ("queued", 0)

    running = api.wait_for(submitted["id"], "running")
    assert running["worker"].startswith(f"{worker.name}@")
    assert (running["attempt"], running["device"]) == (1, "cpu")
    assert running["started_at"] is not None
    done = api.wait_for(submitted["id"], "succeeded")

    assert done["result"] == {"message": "hello"}
    assert (done["attempt"], done["progress"], done["error"]) == (1, 1.0, None)
    assert done["finished_at"] >= done["started_at"] >= done["created_at"]


@SQLITE_ONLY
def test_failing_job_ends_failed_with_its_error_and_log_lines(api: Any, worker: Any) -> None:
    job = api.submit("echo", {"fail_with": "the disk is on fire"})

    failed = api.wait_for(job["id"], "failed")

    assert failed["error"] == {"type": "JobFailure", "message": "the disk is on fire"}
    assert failed["result"] is None
    events = api.get(f"/jobs/{job['id']}/events")["events"]
    assert any(e["level"] == "error" and "the disk is on fire" in e["message"] for e in events), (
        events
    )


def test_cancel_stops_a_running_job_and_a_cancelled_queued_job_never_starts(
    api: Any, worker: Any
) -> None:
    running = api.submit("echo", {"message": "busy", "sleep_s": 60})
    api.wait_for(running["id"], "running")
    # The worker runs one job at a time and reserves none, so this one waits in Redis.
    queued = api.submit("echo", {"message": "never"})

    cancelled_queued = api.cancel(queued["id"])
    asked = api.cancel(running["id"])

    assert (cancelled_queued["state"], cancelled_queued["started_at"]) == ("cancelled", None)
    assert (asked["state"], asked["cancel_requested"]) == ("running", True)
    stopped = api.wait_for(running["id"], "cancelled", timeout=30)
    assert stopped["started_at"] is not None
    assert stopped["finished_at"] is not None
    assert (stopped["result"], stopped["error"]) == (None, None)
    assert stopped["progress"] < 1.0
    # Messages are delivered in order: once a later job ran, the cancelled one's was consumed.
    later = api.submit("echo", {"message": "after"})
    api.wait_for(later["id"], "succeeded")
    final = api.job(queued["id"])
    assert (final["state"], final["started_at"], final["attempt"], final["worker"]) == (
        "cancelled",
        None,
        0,
        None,
    )
    assert f"job={queued['id']} attempt=0 event=dropped reason=stale_message" in worker.log()


@SQLITE_ONLY
def test_a_duplicated_message_runs_the_job_only_once(
    api: Any,
    worker: Any,
    celery_app: Celery,
    create_job: Callable[..., Job],
    wait_until: Callable[..., Any],
) -> None:
    job = create_job(spec={"message": "twice", "sleep_s": 0.5})  # queued, no message sent

    for _ in range(2):
        send_run(celery_app, job.id, 0, routing.CPU_QUEUE, priority=0)

    done = api.wait_for(job.id, "succeeded")
    assert (done["attempt"], done["result"]) == (1, {"message": "twice"})
    dropped = f"job={job.id} attempt=0 event=dropped reason=stale_message"
    wait_until(
        lambda: dropped in worker.log(),
        lambda: f"the worker to drop the second message:\n{worker.tail()}",
    )
    assert worker.log().count(f"job={job.id} attempt=1 event=claimed") == 1
    assert api.job(job.id)["attempt"] == 1
