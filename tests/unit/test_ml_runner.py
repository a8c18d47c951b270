"""The train runner through workers.execute, with a real RunContext on a real database:
series, registration, regression, cancellation, resume_from, and DDP on CPU (gloo)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from modelkit import never_resent
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.engine import session_scope
from db.models import Job, JobEvent, Metric, ModelVersion
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from workers import context
from workers.execute import execute_attempt
from workers.ml import checkpoint as ckpt
from workers.ml.training import Hooks
from workers.runners import train
from workers.runtime import Runtime

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

SMALL = {"dataset": "builtin:digits", "arch_params": {"hidden": [32]}, "batch_size": 64}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def runtime(settings: Settings, sessions: sessionmaker[Session]) -> Runtime:
    return Runtime(
        settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir)
    )


@pytest.fixture
def run_job(
    runtime: Runtime, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> Callable[..., Job]:
    """run_job(spec, kind="train", owner="alice") -> the job row after one attempt ran."""

    def run(spec: dict[str, Any], kind: str = "train", owner: str = "alice") -> Job:
        job = create_job(owner=owner, kind=kind, spec=spec)
        execute_attempt(runtime, job.id, 0, worker="test", send=never_resent)
        with sessions() as session:
            found = session.get(Job, job.id)
            assert found is not None
            session.expunge(found)
            return found

    return run


def _series(sessions: sessionmaker[Session], job_id: str) -> dict[str, list[int]]:
    with sessions() as session:
        points = session.scalars(select(Metric).where(Metric.job_id == job_id))
        series: dict[str, list[int]] = {}
        for point in points:
            series.setdefault(point.name, []).append(point.step)
    return {name: sorted(steps) for name, steps in series.items()}


def _log(sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with sessions() as session:
        return list(
            session.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )


def _cancel_after_epoch(
    monkeypatch: pytest.MonkeyPatch, sessions: sessionmaker[Session], epoch: int
) -> None:
    """Ask to cancel the running job once `epoch` has reported; checks are not throttled."""
    monkeypatch.setattr(context, "_THROTTLE_S", 0.0)
    make_hooks = train.job_hooks

    def hooks_that_cancel(spec: Any, ctx: context.RunContext) -> Hooks:
        hooks = make_hooks(spec, ctx)

        def epoch_then_cancel(number: int, metrics: dict[str, float]) -> None:
            hooks.epoch(number, metrics)
            if number == epoch:
                with session_scope(sessions) as session:
                    jobs.request_cancel(session, session.get(Job, ctx.job_id))  # type: ignore[arg-type]

        return dataclasses.replace(hooks, epoch=epoch_then_cancel)

    monkeypatch.setattr(train, "job_hooks", hooks_that_cancel)


def test_train_job_stores_series_and_registers_one_version(
    run_job: Callable[..., Job], sessions: sessionmaker[Session], settings: Settings
) -> None:
    job = run_job({**SMALL, "model_name": "digits", "epochs": 3, "log_every_steps": 10})
    assert job.state == "succeeded", job.error_message
    assert job.result is not None
    assert job.result["version"] == 1
    assert job.result["task"] == "classification"
    assert set(job.result["metrics"]) == {"val_loss", "val_accuracy", "val_f1"}
    series = _series(sessions, job.id)
    for name in ("train_loss", "val_loss", "val_accuracy", "val_f1", "lr"):
        assert series[name] == [1, 2, 3]
    assert series["train_loss_step"] == list(range(10, 61, 10))  # 23 steps per epoch
    with sessions() as session:
        version = session.scalar(select(ModelVersion).where(ModelVersion.source_job_id == job.id))
        assert version is not None
        assert version.config["task"] == "classification"
    assert not ckpt.exists(settings.data_dir / "work" / job.id / ckpt.FILENAME)


def test_same_seed_same_metrics_through_the_runner(run_job: Callable[..., Job]) -> None:
    spec = {**SMALL, "epochs": 2, "seed": 11}
    first = run_job({**spec, "model_name": "a"})
    second = run_job({**spec, "model_name": "b"})
    assert first.result is not None
    assert second.result is not None
    assert first.result["metrics"] == second.result["metrics"]


def test_regression_job_predicts_values(run_job: Callable[..., Job]) -> None:
    job = run_job(
        {"model_name": "sugar", "dataset": "builtin:diabetes", "epochs": 5, "arch": "logreg"}
    )
    assert job.state == "succeeded", job.error_message
    assert job.result is not None
    assert job.result["task"] == "regression"
    assert set(job.result["metrics"]) == {"val_loss", "val_mae", "val_rmse"}
    predicted = run_job({"model": "sugar", "inputs": [[0.0] * 10]}, kind="predict")
    assert predicted.state == "succeeded", predicted.error_message
    [row] = predicted.result["predictions"]  # type: ignore[index]
    assert set(row) == {"value"}
    assert 25 < row["value"] < 350


def test_task_given_against_the_data_fails_clearly(run_job: Callable[..., Job]) -> None:
    job = run_job({"model_name": "x", "dataset": "builtin:diabetes", "task": "classification"})
    assert job.state == "failed"
    assert "builtin:diabetes is a regression dataset" in (job.error_message or "")


def test_cnn_on_flat_rows_fails_clearly(run_job: Callable[..., Job]) -> None:
    job = run_job({"model_name": "x", "arch": "cnn", "dataset": "builtin:iris"})
    assert job.state == "failed"
    assert "cnn needs image rows" in (job.error_message or "")


def test_a_diverging_job_fails_with_a_reason_and_no_nan_in_its_series(
    run_job: Callable[..., Job], sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(context, "_THROTTLE_S", 0.0)  # every epoch's points are written at once
    job = run_job({**SMALL, "model_name": "x", "optimizer": "sgd", "lr": 10, "epochs": 3})
    assert (job.state, job.error_type) == ("failed", "JobFailure")
    assert (job.error_message or "").startswith("training diverged: ")
    with sessions() as session:
        values = session.scalars(select(Metric.value).where(Metric.job_id == job.id)).all()
    assert all(value == value and abs(value) != float("inf") for value in values)


def test_cancelled_job_keeps_its_checkpoint_and_a_new_job_resumes_from_it(
    run_job: Callable[..., Job],
    sessions: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = {**SMALL, "model_name": "digits", "epochs": 4}
    with monkeypatch.context() as patch:
        _cancel_after_epoch(patch, sessions, epoch=2)
        first = run_job(spec)
    assert first.state == "cancelled"
    assert _series(sessions, first.id)["val_loss"] == [1, 2]  # stopped within a step
    assert ckpt.exists(settings.data_dir / "work" / first.id / ckpt.FILENAME)

    second = run_job({**spec, "resume_from": first.id})
    assert second.state == "succeeded", second.error_message
    assert second.result is not None
    assert second.result["resumed_from_epoch"] == 3
    # The curve goes on from the checkpoint's history; only epochs 3 and 4 were trained here.
    assert _series(sessions, second.id)["val_loss"] == [1, 2, 3, 4]
    log = _log(sessions, second.id)
    assert "resuming from checkpoint at epoch 3 step 0" in log
    assert [line.split(":")[0] for line in log if line.startswith("epoch ")] == [
        "epoch 3",
        "epoch 4",
    ]


def test_resume_from_a_job_that_ran_on_another_host_takes_its_published_checkpoint(
    run_job: Callable[..., Job],
    sessions: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = {**SMALL, "model_name": "digits", "epochs": 4}
    with monkeypatch.context() as patch:
        _cancel_after_epoch(patch, sessions, epoch=2)
        first = run_job(spec)
    assert first.state == "cancelled"
    # This host never saw the first job's scratch folder; the artifact store holds the
    # save it published when it stopped.
    shutil.rmtree(settings.data_dir / "work")

    second = run_job({**spec, "resume_from": first.id})
    assert second.state == "succeeded", second.error_message
    assert second.result is not None
    assert second.result["resumed_from_epoch"] == 3
    assert _series(sessions, second.id)["val_loss"] == [1, 2, 3, 4]


def test_a_checkpoint_an_older_kiln_left_for_the_job_is_set_aside_not_fatal(
    runtime: Runtime, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = create_job(kind="train", spec={**SMALL, "model_name": "upgraded", "epochs": 2})
    # An attempt before an upgrade saved a checkpoint whose key the new code does not know.
    old = ckpt.Checkpoint({"model": {"w": torch.zeros(1)}}, {"key": {"config": {}}}, sequence=1)
    scratch = runtime.settings.data_dir / "work" / job.id
    scratch.mkdir(parents=True)
    ckpt.save(old, scratch / ckpt.FILENAME)

    execute_attempt(runtime, job.id, 0, "w1", never_resent)

    with sessions() as session:
        done = session.get(Job, job.id)
        assert done is not None
        assert done.state == "succeeded", done.error_message
        assert done.result is not None
        assert done.result["resumed_from_epoch"] is None
    assert "ignoring a checkpoint in an older layout; starting over" in _log(sessions, job.id)


def test_a_warm_shutdown_checkpoints_the_step_it_stopped_at_and_the_next_attempt_goes_on(
    runtime: Runtime,
    create_job: Callable[..., Job],
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = create_job(kind="train", spec={**SMALL, "model_name": "warm", "epochs": 2})
    monkeypatch.setattr(context, "_THROTTLE_S", 0.0)  # progress is reported at every step
    report = context.RunContext.progress

    def progress_then_sigterm(self: context.RunContext, fraction: float, *a: Any, **k: Any) -> None:
        report(self, fraction, *a, **k)
        if fraction > 0.2:  # mid-epoch 1: what workers.shutdown does on SIGTERM
            context.SHUTDOWN.set()

    sent: list[tuple[str, int]] = []
    with monkeypatch.context() as patch:
        patch.setattr(context.RunContext, "progress", progress_then_sigterm)
        try:
            execute_attempt(runtime, job.id, 0, "w1", lambda j, _: sent.append((j.id, j.attempt)))
        finally:
            context.SHUTDOWN.clear()

    with sessions() as session:
        requeued = session.get(Job, job.id)
        assert requeued is not None
        assert (requeued.state, requeued.shutdown_attempts) == ("queued", 1)
    assert sent == [(job.id, requeued.attempt)]
    execute_attempt(runtime, job.id, requeued.attempt, "w2", never_resent)

    with sessions() as session:
        done = session.get(Job, job.id)
        assert done is not None
        assert done.state == "succeeded", done.error_message
    resumed = [line for line in _log(sessions, job.id) if line.startswith("resuming from")]
    assert len(resumed) == 1
    epoch, step = (int(word) for word in resumed[0].split()[-3::2])
    assert epoch == 1
    assert step > 0  # within the epoch, not back at its start


def test_resume_from_refuses_other_owners_and_jobs_without_checkpoints(
    run_job: Callable[..., Job], create_job: Callable[..., Job]
) -> None:
    bobs = create_job(owner="bob", kind="train", spec={"model_name": "m"}, state="failed")
    stolen = run_job({**SMALL, "model_name": "m", "resume_from": bobs.id})
    assert stolen.state == "failed"
    assert f"no train job {bobs.id} of yours" in (stolen.error_message or "")
    mine = create_job(kind="train", spec={"model_name": "m"}, state="failed")
    empty = run_job({**SMALL, "model_name": "m", "resume_from": mine.id})
    assert empty.state == "failed"
    assert f"job {mine.id} left no checkpoint" in (empty.error_message or "")


def test_two_gloo_processes_train_with_ddp_on_cpu(
    run_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = run_job({**SMALL, "model_name": "ddp", "epochs": 2, "gpus": 2, "device": "cpu"})
    assert job.state == "succeeded", job.error_message
    assert "2 processes joined the gloo group" in _log(sessions, job.id)
    assert _series(sessions, job.id)["val_accuracy"] == [1, 2]
    assert job.result is not None
    assert job.result["metrics"]["val_accuracy"] > 0.8
    assert multiprocessing.active_children() == []
    with sessions() as session:
        count = session.scalar(
            select(func.count())
            .select_from(ModelVersion)
            .where(ModelVersion.source_job_id == job.id)
        )
    assert count == 1


def test_cancelling_a_ddp_job_stops_every_rank(
    run_job: Callable[..., Job], sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _cancel_after_epoch(monkeypatch, sessions, epoch=1)
    job = run_job({**SMALL, "model_name": "ddp", "epochs": 5, "gpus": 2, "device": "cpu"})
    assert job.state == "cancelled"
    assert _series(sessions, job.id)["val_loss"] == [1]
    assert multiprocessing.active_children() == []
