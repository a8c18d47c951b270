"""Queue names and how a job picks one: the one place where they are decided."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.specs import Spec

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
RUN_TASK = "kiln.jobs.run"


def gpu_queue(gpu: str) -> str:
    """The private queue of the worker pinned to GPU `gpu` (its CUDA index or UUID)."""
    return f"gpu.{gpu}"


def multi_gpu_queue(gpus: int) -> str:
    """The queue of jobs that need `gpus` GPUs at once, served by workers holding that many."""
    return f"gpu.x{gpus}"


def queue_for(spec: Spec) -> str:
    """Route a job by its device class: gpu work to the shared gpu queue, the rest to cpu.

    `auto` goes to the cpu queue, which every host serves; a GPU worker also serves that
    queue when it is otherwise idle, so auto work uses GPUs where they exist. A gpu job
    that needs several GPUs goes to the queue of workers pinned to that many (on the CPU,
    several processes are just processes: its gloo run stays in the cpu queue).
    """
    if spec.device != "gpu":
        return CPU_QUEUE
    gpus = getattr(spec, "gpus", 1)  # only kinds that can use several GPUs have the field
    return multi_gpu_queue(gpus) if gpus > 1 else GPU_QUEUE
