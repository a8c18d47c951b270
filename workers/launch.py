"""The worker launcher: Celery worker processes per GPU and lane, pinned before torch loads.

plan() decides (pure, testable without a GPU); run() starts the processes, restarts one
that dies, and stops them all on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln import routing
from kiln.settings import Settings
from kiln.supervise import Supervisor
from workers import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerProcess:
    name: str
    queues: tuple[str, ...]
    #: Environment entries set for this process only (CUDA_VISIBLE_DEVICES).
    env: Mapping[str, str]

    def argv(self) -> list[str]:
        return [
            # --quiet: no banner printed as text; workers/main.py logs what it said.
            sys.executable, "-m", "celery", "-A", "workers.main", "--quiet", "worker",
            "--hostname", f"{self.name}@%h",
            "--queues", ",".join(self.queues),
            # One job at a time per device, and no job waits reserved behind it.
            "--concurrency", "1", "--prefetch-multiplier", "1",
            "--pool", "prefork", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip", "--task-events",
        ]  # fmt: skip


def plan(
    gpu_ids: Sequence[str],
    cpu_workers: int | None,
    lanes: Mapping[routing.Lane, int] | None = None,
    *,
    cpu_count: int | None = None,
    interactive_threads: int = 1,
) -> list[WorkerProcess]:
    """Per GPU, `lanes[bulk]` bulk workers and `lanes[interactive]` interactive workers,
    all pinned to it (kiln.routing.lane_queues says what each serves); then the same for
    each of `cpu_workers` CPU devices (default: one when there is no GPU, else none).

    An entry "0+1" reserves GPUs 0 and 1 for its workers: they see both, and its bulk
    workers also serve the queues of jobs that need 2 (or fewer, above 1) GPUs at once.

    torch's intra-op threads are set for each process (OMP_NUM_THREADS, read when torch
    loads): `interactive_threads` per interactive worker, and the host's other cores
    shared among the bulk workers, so two torch processes never oversubscribe the CPU.
    """
    sizes = dict(lanes) if lanes is not None else {routing.BULK: 1, routing.INTERACTIVE: 1}
    count = cpu_workers if cpu_workers is not None else (0 if gpu_ids else 1)
    devices: list[tuple[str, str | None, str]] = [
        (f"gpu{'-'.join(entry.split('+'))}", entry, ",".join(entry.split("+"))) for entry in gpu_ids
    ]
    # A CPU worker sees no GPU, so nothing it runs can grab one by accident.
    devices += [(f"cpu{n}", None, "") for n in range(count)]
    threads = _thread_budget(
        len(devices) * sizes.get(routing.BULK, 0),
        len(devices) * sizes.get(routing.INTERACTIVE, 0),
        cpu_count or os.cpu_count() or 1,
        interactive_threads,
    )
    workers = []
    for name, entry, visible in devices:
        for lane in routing.LANES:
            for n in range(sizes.get(lane, 0)):
                workers.append(
                    WorkerProcess(
                        name=_worker_name(name, lane, n),
                        queues=routing.lane_queues(lane, entry),
                        env={
                            "CUDA_VISIBLE_DEVICES": visible,
                            "OMP_NUM_THREADS": str(threads[lane]),
                            "MKL_NUM_THREADS": str(threads[lane]),
                        },
                    )
                )
    return workers


def _worker_name(device: str, lane: routing.Lane, n: int) -> str:
    """gpu0 for a device's first bulk worker (the name it had before lanes), gpu0-b1 for
    a second, gpu0-i0 for its first interactive worker."""
    if lane == routing.BULK:
        return device if n == 0 else f"{device}-b{n}"
    return f"{device}-i{n}"


def _thread_budget(
    bulk: int, interactive: int, cores: int, interactive_threads: int
) -> dict[routing.Lane, int]:
    """Threads per worker of each lane: what interactive workers ask for, and the cores
    they leave shared among the bulk workers (at least one each)."""
    left = cores - interactive * interactive_threads
    per_bulk = max(1, left // bulk) if bulk else 1
    return {routing.BULK: per_bulk, routing.INTERACTIVE: interactive_threads}


def visible_gpus(setting: str, environ: Mapping[str, str]) -> list[str]:
    """The GPUs to pin workers to: the setting, else the operator's CUDA_VISIBLE_DEVICES,
    else every GPU nvidia-smi lists."""
    if setting == "none":
        return []
    if setting != "auto":
        return [g.strip() for g in setting.split(",") if g.strip()]
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    return _nvidia_smi_gpus()


def _nvidia_smi_gpus() -> list[str]:
    # nvidia-smi rather than torch.cuda: the launcher must not initialise CUDA itself.
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],  # noqa: S607
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def run(settings: Settings) -> int:
    """Start the planned workers and supervise them until signalled; returns an exit code."""
    workers = plan(
        visible_gpus(settings.gpus, os.environ),
        settings.cpu_workers,
        settings.lane_sizes,
        interactive_threads=settings.interactive_threads,
    )
    if not workers:
        log.error("event=no_workers reason='no GPU is visible and KILN_CPU_WORKERS is 0'")
        return 2
    env = dict(os.environ)
    if settings.metrics_port:
        # Every worker of this host (and its pool processes) counts into one folder that
        # this process serves: one Prometheus target per host.
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics.prepare_dir(settings))
        try:
            metrics.serve(settings, Path(env["PROMETHEUS_MULTIPROC_DIR"]))
        except OSError as exc:  # the port is taken: run the workers anyway, unmeasured
            log.error("event=metrics_unavailable port=%d error=%s", settings.metrics_port, exc)
    supervisor = Supervisor(restart=True)
    for worker in workers:
        log.info("event=worker_planned name=%s queues=%s", worker.name, ",".join(worker.queues))
        supervisor.add(worker.name, worker.argv(), {**env, **worker.env})
    return supervisor.run()
