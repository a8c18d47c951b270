"""Queue names and how a job picks one: the one place where they are decided."""

from __future__ import annotations

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
MAINTENANCE_QUEUE = "maintenance"
RUN_TASK = "kiln.jobs.run"


def gpu_queue(gpu: str) -> str:
    """The private queue of the worker pinned to GPU `gpu` (its CUDA index or UUID)."""
    return f"gpu.{gpu}"


def queue_for(device: str) -> str:
    """Route a job by its device class: gpu work to the shared gpu queue, the rest to cpu.

    `auto` goes to the cpu queue, which every host serves; a GPU worker also serves that
    queue when it is otherwise idle, so auto work uses GPUs where they exist.
    """
    return GPU_QUEUE if device == "gpu" else CPU_QUEUE
