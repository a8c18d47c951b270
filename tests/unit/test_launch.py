"""workers.launch: which worker processes start, pinned to which GPU, serving which queues."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kiln import routing
from kiln.settings import Settings
from kiln.specs import parse_spec
from workers.launch import WorkerProcess, plan, run, visible_gpus


def _option(argv: list[str], name: str) -> str:
    """The value that follows option `name` in argv."""
    return argv[argv.index(name) + 1]


#: The bulk lane alone: one worker per device, as before lanes (tests/unit/test_lanes.py
#: covers the interactive workers beside them).
BULK_ONLY = {"bulk": 1, "interactive": 0}


def test_one_worker_per_gpu_pinned_to_it_serving_its_queue_then_gpu_then_cpu() -> None:
    workers = plan(["0", "1"], cpu_workers=None, lanes=BULK_ONLY)

    assert [w.name for w in workers] == ["gpu0", "gpu1"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1"]
    assert [w.queues for w in workers] == [("gpu.0", "gpu", "cpu"), ("gpu.1", "gpu", "cpu")]


def test_a_gpu_group_is_one_worker_that_sees_them_all_and_serves_multi_gpu_jobs() -> None:
    big, small = plan(["0+1+2", "3"], cpu_workers=None, lanes=BULK_ONLY)

    assert (big.name, big.env["CUDA_VISIBLE_DEVICES"]) == ("gpu0-1-2", "0,1,2")
    assert big.queues == ("gpu.0+1+2", "gpu.x3", "gpu.x2", "gpu", "cpu")
    assert small.queues == ("gpu.3", "gpu", "cpu")


@pytest.mark.parametrize(("kind", "spec", "queue"), [
    ("train", {"device": "gpu"}, "gpu"),
    ("train", {"device": "gpu", "gpus": 2}, "gpu.x2"),
    ("train", {"device": "cpu", "gpus": 2}, "cpu"),
    ("train", {"gpus": 4}, "cpu"),
    ("echo", {"device": "gpu"}, "interactive.gpu"),
])  # fmt: skip
def test_jobs_needing_several_gpus_go_where_a_worker_holds_that_many(
    kind: str, spec: dict[str, object], queue: str
) -> None:
    train = {"model_name": "m", "dataset": "builtin:digits"} if kind == "train" else {}
    assert routing.queue_for(parse_spec(kind, train | spec)) == queue


def test_without_gpus_one_cpu_worker_that_sees_no_gpu() -> None:
    (worker,) = plan([], cpu_workers=None, lanes=BULK_ONLY)

    assert worker.name == "cpu0"
    assert worker.queues == ("cpu",)
    assert worker.env["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(("gpus", "cpu_workers", "names"), [
    (["0"], 2, ["gpu0", "cpu0", "cpu1"]),
    ([], 3, ["cpu0", "cpu1", "cpu2"]),
    (["0"], 0, ["gpu0"]),
])  # fmt: skip
def test_cpu_workers_setting_adds_cpu_workers_beside_gpu_workers(
    gpus: list[str], cpu_workers: int, names: list[str]
) -> None:
    assert [w.name for w in plan(gpus, cpu_workers, BULK_ONLY)] == names


@pytest.mark.parametrize(
    "worker",
    [
        WorkerProcess(name="gpu3", queues=("gpu.3", "gpu", "cpu"), env={}),
        WorkerProcess(name="cpu0", queues=("cpu",), env={}),
    ],
    ids=["gpu", "cpu"],
)
def test_worker_argv_runs_one_job_at_a_time_and_reserves_none(worker: WorkerProcess) -> None:
    argv = worker.argv()

    # --quiet: Celery's banner is not printed as text (workers/main.py logs it as a line).
    assert argv[:7] == [sys.executable, "-m", "celery", "-A", "workers.main", "--quiet", "worker"]
    assert _option(argv, "--concurrency") == "1"
    assert _option(argv, "--prefetch-multiplier") == "1"
    assert _option(argv, "--pool") == "prefork"
    assert _option(argv, "--queues") == ",".join(worker.queues)
    assert _option(argv, "--hostname") == f"{worker.name}@%h"


def test_gpus_none_plans_no_gpu_worker_even_where_gpus_are_visible() -> None:
    assert visible_gpus("none", {"CUDA_VISIBLE_DEVICES": "0,1"}) == []


def test_nothing_to_run_is_an_error_not_a_silent_idle_launcher(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, gpus="none", cpu_workers=0, metrics_port=0)

    assert run(settings) == 2


def test_kiln_gpus_environment_variable_reaches_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILN_GPUS", "none")

    assert visible_gpus(Settings().gpus, {"CUDA_VISIBLE_DEVICES": "0"}) == []


def test_explicit_gpu_list_wins_over_the_environment() -> None:
    assert visible_gpus(" 0, 2 ,", {"CUDA_VISIBLE_DEVICES": "1"}) == ["0", "2"]


@pytest.mark.parametrize(
    ("cuda_visible_devices", "expected"),
    [("1,3", ["1", "3"]), ("GPU-8f3a", ["GPU-8f3a"]), ("", [])],
    ids=["indices", "uuid", "empty-hides-all"],
)
def test_operators_cuda_visible_devices_is_respected(
    cuda_visible_devices: str, expected: list[str], fake_nvidia_smi: Path
) -> None:
    # nvidia-smi would list GPUs 0 and 1; the operator's choice is what counts.
    gpus = visible_gpus("auto", {"CUDA_VISIBLE_DEVICES": cuda_visible_devices})

    assert gpus == expected
    planned = plan(gpus, None, BULK_ONLY)
    pinned = [w.env["CUDA_VISIBLE_DEVICES"] for w in planned if w.queues[0] != "cpu"]
    assert pinned == expected


def test_auto_lists_the_gpus_nvidia_smi_reports(fake_nvidia_smi: Path) -> None:
    assert visible_gpus("auto", {}) == ["0", "1"]


def test_auto_without_nvidia_smi_means_no_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi anywhere

    assert visible_gpus("auto", {}) == []


def test_auto_with_a_failing_nvidia_smi_means_no_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _write_script(tmp_path / "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    monkeypatch.setenv("PATH", str(tmp_path))

    assert visible_gpus("auto", {}) == []


@pytest.fixture
def fake_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An nvidia-smi on PATH that reports two GPUs, indices 0 and 1."""
    script = _write_script(tmp_path / "nvidia-smi", "printf '0\\n1\\n'\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    return script


def _write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path
