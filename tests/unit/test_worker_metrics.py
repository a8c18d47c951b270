"""workers.metrics: what a finished attempt adds to the worker's counters."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from kiln.settings import Settings
from workers import metrics
from workers.launch import run


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def on_test_database(monkeypatch: pytest.MonkeyPatch, sessions) -> None:
    """observe_job reads the job through this process's runtime: point it at the test DB."""
    import workers.runtime

    monkeypatch.setattr(workers.runtime, "runtime", lambda: SimpleNamespace(sessions=sessions))


@pytest.mark.usefixtures("on_test_database")
def test_a_finished_attempt_is_counted_for_the_worker_that_ran_it(create_job: Callable) -> None:
    job = create_job(kind="echo", state="succeeded")  # claimed by "worker-1"
    labels = {"worker": "worker-1", "kind": "echo", "state": "succeeded"}
    before = count("kiln_worker_jobs_total", **labels)
    durations = count("kiln_job_duration_seconds_count", kind="echo", state="succeeded")
    metrics.observe_job(job.id, "worker-1", since=job.created_at)
    assert count("kiln_worker_jobs_total", **labels) == before + 1
    after = count("kiln_job_duration_seconds_count", kind="echo", state="succeeded")
    assert after == durations + 1


@pytest.mark.usefixtures("on_test_database")
def test_a_duplicate_message_for_a_finished_job_counts_nothing(create_job: Callable) -> None:
    job = create_job(kind="echo", state="succeeded")
    labels = {"worker": "worker-1", "kind": "echo", "state": "succeeded"}
    before = count("kiln_worker_jobs_total", **labels)
    metrics.observe_job(job.id, "worker-1", since=job.finished_at + timedelta(seconds=1))
    assert count("kiln_worker_jobs_total", **labels) == before


@pytest.mark.usefixtures("on_test_database")
@pytest.mark.parametrize(("state", "worker"), [("succeeded", "worker-2"), ("running", "worker-1")])
def test_attempts_not_finished_by_this_worker_are_not_counted(
    create_job: Callable, state: str, worker: str
) -> None:
    job = create_job(kind="echo", state=state)
    before = count("kiln_worker_jobs_total", worker=worker, kind="echo", state=state)
    metrics.observe_job(job.id, worker, since=job.created_at)
    assert count("kiln_worker_jobs_total", worker=worker, kind="echo", state=state) == before


@pytest.mark.parametrize(
    ("result", "rows"),
    [({"rows": 1000}, 1000), ({"predictions": [{}, {}, {}]}, 3), ({"model": "m"}, 0), ({}, 0)],
)
def test_rows_come_from_the_result(result: dict, rows: int) -> None:
    assert metrics.rows_of(result) == rows


def test_without_nvml_there_are_no_gpu_series() -> None:
    try:
        import pynvml  # noqa: F401

        pytest.skip("nvidia-ml-py is installed here")
    except ImportError:
        pass
    assert list(metrics.GpuCollector().collect()) == []


def test_each_gpu_series_is_labelled_with_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: a stand-in for NVML's calls (nvidia-ml-py) with two devices.
    nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=50 + handle),
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=100 + handle, total=1000),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    registry = CollectorRegistry()
    registry.register(metrics.GpuCollector())

    exposition = generate_latest(registry).decode()

    assert registry.get_sample_value("kiln_gpu_utilization_ratio", {"gpu": "1"}) == 0.51
    assert registry.get_sample_value("kiln_gpu_memory_used_bytes", {"gpu": "0"}) == 100
    assert registry.get_sample_value("kiln_gpu_memory_total_bytes", {"gpu": "1"}) == 1000
    assert 'kiln_gpu_memory_used_bytes{gpu="1"} 101.0' in exposition
    samples = [line for line in exposition.splitlines() if not line.startswith("#")]
    assert all("{gpu=" in line for line in samples), samples  # no unlabelled sample


def test_a_taken_metrics_port_does_not_stop_the_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # KILN_HOST's default, where the metrics server binds
        taken.listen()
        port = taken.getsockname()[1]
        started: list[str] = []

        def supervise(self) -> int:
            started.extend(child.name for child in self.children)
            return 0

        monkeypatch.setattr("workers.launch.Supervisor.run", supervise)
        settings = Settings(data_dir=tmp_path, gpus="none", metrics_port=port)
        assert run(settings) == 0
    assert started == ["cpu0", "cpu0-i0"]  # the CPU's bulk and interactive workers
