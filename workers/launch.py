"""The worker launcher: one Celery worker process per GPU, pinned before torch loads.

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


def plan(gpu_ids: Sequence[str], cpu_workers: int | None) -> list[WorkerProcess]:
    """One worker per GPU (its own queue, the shared gpu queue, then cpu work when idle),
    plus `cpu_workers` CPU workers (default: one when there is no GPU, else none).

    An entry "0+1" reserves GPUs 0 and 1 for one worker: it sees both, and besides the
    single-GPU queues it serves the queues of jobs that need 2 (or fewer, above 1) GPUs
    at once (`gpus: N` training with DistributedDataParallel), largest first.
    """
    workers = []
    for entry in gpu_ids:
        group = entry.split("+")
        multi = tuple(routing.multi_gpu_queue(n) for n in range(len(group), 1, -1))
        workers.append(
            WorkerProcess(
                name=f"gpu{'-'.join(group)}",
                queues=(routing.gpu_queue(entry), *multi, routing.GPU_QUEUE, routing.CPU_QUEUE),
                env={"CUDA_VISIBLE_DEVICES": ",".join(group)},
            )
        )
    count = cpu_workers if cpu_workers is not None else (0 if gpu_ids else 1)
    # A CPU worker sees no GPU, so nothing it runs can grab one by accident.
    workers += [
        WorkerProcess(name=f"cpu{n}", queues=(routing.CPU_QUEUE,), env={"CUDA_VISIBLE_DEVICES": ""})
        for n in range(count)
    ]
    return workers


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
    workers = plan(visible_gpus(settings.gpus, os.environ), settings.cpu_workers)
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
