"""Lanes: which queue each kind goes to, which workers the launcher plans per device and
lane (queues, pinning, torch threads), KILN_LANES validation, and the interactive lane's
time limit telling a slow predict to use batch_predict."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from db.models import Job
from kiln import routing
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from kiln.specs import KINDS, parse_spec
from workers import execute
from workers.launch import plan
from workers.runtime import Runtime

_TRAIN = {"model_name": "m", "dataset": "builtin:digits"}
_PREDICT = {"model": "m", "inputs": [[1.0]]}


@pytest.mark.parametrize(("kind", "spec", "queue"), [
    ("predict", _PREDICT, "interactive.cpu"),
    ("predict", _PREDICT | {"device": "gpu"}, "interactive.gpu"),
    ("echo", {}, "interactive.cpu"),
    ("echo", {"device": "gpu"}, "interactive.gpu"),
    ("train", _TRAIN, "cpu"),
    ("train", _TRAIN | {"device": "gpu"}, "gpu"),
    ("train", _TRAIN | {"device": "gpu", "gpus": 2}, "gpu.x2"),
    ("batch_predict", {"model": "m", "dataset": "d"}, "cpu"),
    ("optimize", {"model": "m"}, "cpu"),
    ("export", {"model": "m"}, "cpu"),
])  # fmt: skip
def test_short_kinds_go_to_the_interactive_lane_and_the_rest_keep_todays_queues(
    kind: str, spec: dict[str, Any], queue: str
) -> None:
    assert routing.queue_for(parse_spec(kind, spec)) == queue
    assert routing.lane_of_queue(queue) == routing.lane_of(kind)


def test_the_lane_of_every_kind_is_decided_by_its_spec_class() -> None:
    lanes = {kind: routing.lane_of(kind) for kind in KINDS}

    assert lanes == {
        "train": "bulk",
        "batch_predict": "bulk",
        "optimize": "bulk",
        "export": "bulk",
        "predict": "interactive",
        "echo": "interactive",
    }


def test_jobs_queued_before_lanes_existed_stay_in_a_served_bulk_queue() -> None:
    # A predict queued under "cpu" by an older release is served by the cpu bulk worker.
    (bulk,) = [w for w in plan([], None) if routing.lane_of_queue(w.queues[0]) == "bulk"]

    assert routing.lane_of_queue("cpu") == "bulk"
    assert "cpu" in bulk.queues


def test_each_gpu_gets_a_bulk_and_an_interactive_worker_pinned_to_it() -> None:
    workers = plan(["0", "1"], cpu_workers=None, cpu_count=8)

    assert [(w.name, w.queues, w.env["CUDA_VISIBLE_DEVICES"]) for w in workers] == [
        ("gpu0", ("gpu.0", "gpu", "cpu"), "0"),
        ("gpu0-i0", ("interactive.gpu.0", "interactive.gpu", "interactive.cpu"), "0"),
        ("gpu1", ("gpu.1", "gpu", "cpu"), "1"),
        ("gpu1-i0", ("interactive.gpu.1", "interactive.gpu", "interactive.cpu"), "1"),
    ]


def test_the_cpu_gets_a_bulk_and_an_interactive_worker_that_see_no_gpu() -> None:
    workers = plan([], cpu_workers=None, cpu_count=4)

    assert [(w.name, w.queues, w.env["CUDA_VISIBLE_DEVICES"]) for w in workers] == [
        ("cpu0", ("cpu",), ""),
        ("cpu0-i0", ("interactive.cpu",), ""),
    ]


def test_only_bulk_workers_of_a_gpu_group_serve_multi_gpu_queues() -> None:
    bulk, interactive = plan(["0+1"], cpu_workers=None)

    assert bulk.queues == ("gpu.0+1", "gpu.x2", "gpu", "cpu")
    assert interactive.queues == ("interactive.gpu.0+1", "interactive.gpu", "interactive.cpu")
    assert bulk.env["CUDA_VISIBLE_DEVICES"] == interactive.env["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize(("lanes", "names"), [
    ({"bulk": 1, "interactive": 2}, ["gpu0", "gpu0-i0", "gpu0-i1"]),
    ({"bulk": 1, "interactive": 0}, ["gpu0"]),
    ({"bulk": 0, "interactive": 1}, ["gpu0-i0"]),
    ({"bulk": 2, "interactive": 1}, ["gpu0", "gpu0-b1", "gpu0-i0"]),
])  # fmt: skip
def test_kiln_lanes_sizes_each_lane_per_device(lanes: dict[str, int], names: list[str]) -> None:
    assert [w.name for w in plan(["0"], 0, lanes)] == names  # type: ignore[arg-type]


@pytest.mark.parametrize(("gpus", "cpus", "cores", "bulk", "interactive"), [
    ([], None, 2, "1", "1"),
    ([], None, 16, "15", "1"),
    (["0", "1"], 0, 16, "7", "1"),
    (["0"], 0, 1, "1", "1"),  # never 0 threads, even where cores run out
])  # fmt: skip
def test_interactive_workers_get_one_thread_and_bulk_workers_share_the_other_cores(
    gpus: list[str], cpus: int | None, cores: int, bulk: str, interactive: str
) -> None:
    workers = plan(gpus, cpus, cpu_count=cores)

    for worker in workers:
        lane = routing.lane_of_queue(worker.queues[0])
        expected = bulk if lane == "bulk" else interactive
        assert worker.env["OMP_NUM_THREADS"] == worker.env["MKL_NUM_THREADS"] == expected


def test_interactive_threads_setting_is_taken_from_the_cores_first() -> None:
    workers = plan([], None, {"bulk": 1, "interactive": 2}, cpu_count=8, interactive_threads=2)

    assert [w.env["OMP_NUM_THREADS"] for w in workers] == ["4", "2", "2"]


def test_kiln_lanes_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_LANES", " interactive = 3 ")

    assert Settings().lane_sizes == {"bulk": 1, "interactive": 3}


@pytest.mark.parametrize(("setting", "error"), [
    ("bulk=x", "the count must be a whole number"),
    ("fast=2", "lanes are bulk, interactive"),
    ("bulk", "is not <lane>=<count>"),
    ("bulk=0,interactive=0", "nothing would run"),
])  # fmt: skip
def test_a_bad_kiln_lanes_is_refused_with_a_clear_error(setting: str, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        Settings(lanes=setting)


@pytest.fixture
def run_echo(settings: Settings, sessions):
    """run_echo(job, **settings) -> the job row after one attempt of the real echo runner."""
    runtime = Runtime(
        settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir)
    )

    def attempt(job: Job, **overrides: Any) -> Job:
        this = replace(runtime, settings=settings.model_copy(update=overrides))
        execute.execute_attempt(this, job.id, 0, "w1", lambda job, countdown: None)
        with sessions() as session:
            return session.get(Job, job.id)

    return attempt


def test_an_interactive_job_past_its_lane_limit_is_told_to_use_batch_predict(create_job, run_echo):
    job = create_job(spec={"message": "slow", "sleep_s": 30}, queue="interactive.cpu")

    row = run_echo(job, interactive_time_limit_s=0.2)

    assert (row.state, row.error_type) == ("failed", "TimeLimitExceeded")
    assert row.error_message.startswith("exceeded its time limit of 0.2 s")
    assert "batch_predict" in row.error_message
    assert "KILN_INTERACTIVE_TIME_LIMIT_S" in row.error_message


def test_the_interactive_limit_does_not_apply_to_the_bulk_lane(create_job, run_echo):
    job = create_job(spec={"message": "bulk", "sleep_s": 0.5}, queue="cpu")

    row = run_echo(job, interactive_time_limit_s=0.2)

    assert (row.state, row.result) == ("succeeded", {"message": "bulk"})


def test_a_shorter_general_limit_wins_in_the_interactive_lane_with_its_own_wording(
    create_job, run_echo
):
    job = create_job(spec={"message": "slow", "sleep_s": 30}, queue="interactive.cpu")

    row = run_echo(job, interactive_time_limit_s=60, job_time_limit_s=0.2)

    assert row.error_message == "exceeded its time limit of 0.2 s"
