"""Preemption through real processes: a low-priority train job runs on the only bulk
worker; a high-priority one arrives; the scheduler's sweep asks the low one to make way.
It checkpoints its step, goes back to the queue without spending an attempt, the high one
runs, and the low one resumes where it stopped and ends with the same metrics as an
uninterrupted run with the same seed (bit-for-bit: same worker, same CPU)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job, JobEvent, Metric
from kiln.settings import Settings
from workers import preempt

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

#: Long enough that the low job is still running when the sweep decides, on a quiet fast
#: machine too (at 12 epochs it had finished before the sweep ran there).
EPOCHS = 60
_SPEC = {
    "dataset": "builtin:digits",
    "arch_params": {"hidden": [32]},
    "epochs": EPOCHS,
    "batch_size": 16,
    "seed": 7,
    "device": "cpu",
}


def test_a_high_priority_train_job_preempts_a_low_one_which_resumes_where_it_stopped(
    api: Any,
    start_worker: Callable[..., Any],
    sessions: sessionmaker[Session],
    live_settings: Settings,
    wait_until: Callable[..., Any],
) -> None:
    start_worker("bulk")
    low = api.submit("train", {"model_name": "low", **_SPEC})
    api.wait_for(low["id"], "running")
    wait_until(lambda: _epochs_done(sessions, low["id"]) >= 2, "two epochs of the low job")

    high = _submit(api, "train", {**_SPEC, "model_name": "high", "epochs": 2}, priority=9)
    deciding = live_settings.model_copy(update={"preempt_after_s": 0.0})
    made = wait_until(lambda: preempt.sweep(sessions, deciding), "the sweep to preempt")
    assert made == [preempt.Preemption(low["id"], high["id"])]

    first = api.wait_for(high["id"], "succeeded", timeout=240)
    done = api.wait_for(low["id"], "succeeded", timeout=240)

    with sessions() as session:
        row = session.get(Job, low["id"])
        assert row is not None
        assert (row.attempt, row.charged_attempts, row.preemptions) == (2, 1, 1)
        assert row.preempt_for is None
        events = list(
            session.scalars(
                select(JobEvent.message).where(JobEvent.job_id == low["id"]).order_by(JobEvent.id)
            )
        )
        steps = sorted(
            session.scalars(
                select(Metric.step).where(Metric.job_id == low["id"], Metric.name == "val_loss")
            )
        )
    assert any(e.startswith(f"re-queued: preempted by job {high['id']}") for e in events), events
    assert done["started_at"] >= first["finished_at"]  # the high one ran in between
    assert done["result"]["resumed_from_epoch"] >= 2
    epochs_logged = [int(m.group(1)) for e in events if (m := re.match(r"epoch (\d+):", e))]
    assert epochs_logged == list(range(1, EPOCHS + 1))  # no completed epoch redone
    assert steps == list(range(1, EPOCHS + 1))

    reference = api.submit("train", {"model_name": "ref", **_SPEC})
    reference = api.wait_for(reference["id"], "succeeded", timeout=240)
    assert reference["result"]["resumed_from_epoch"] is None
    assert done["result"]["metrics"] == reference["result"]["metrics"]  # bit-for-bit


def _submit(api: Any, kind: str, spec: dict[str, Any], priority: int) -> dict[str, Any]:
    body = {"kind": kind, "spec": spec, "priority": priority}
    response = api.client.post("/api/v1/jobs", json=body, headers=api.headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()  # type: ignore[no-any-return]


def _epochs_done(sessions: sessionmaker[Session], job_id: str) -> int:
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count()).where(Metric.job_id == job_id, Metric.name == "val_loss")
            )
            or 0
        )
