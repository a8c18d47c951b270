"""Queue names and how a job picks one: the one place where they are decided.

Each device has two lanes, each served by workers of its own (workers.launch.plan):

- `bulk`: long work (train, batch_predict, optimize, export). Its queues keep the names
  Kiln always had (`cpu`, `gpu`, `gpu.x<N>`, `gpu.<n>`), so jobs queued before lanes
  existed still run.
- `interactive`: kinds whose spec class is marked `short` (predict, echo). Its queues are
  the bulk names with an `interactive.` prefix (`interactive.cpu`, `interactive.gpu`,
  `interactive.gpu.<n>`), so a predict never waits behind a training run on its device.
"""

from __future__ import annotations

from typing import Literal

from kiln.specs import KINDS, Spec

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
RUN_TASK = "kiln.jobs.run"

Lane = Literal["interactive", "bulk"]
INTERACTIVE: Lane = "interactive"
BULK: Lane = "bulk"
LANES: tuple[Lane, ...] = (BULK, INTERACTIVE)
_INTERACTIVE_PREFIX = "interactive."
INTERACTIVE_CPU_QUEUE = _INTERACTIVE_PREFIX + CPU_QUEUE
INTERACTIVE_GPU_QUEUE = _INTERACTIVE_PREFIX + GPU_QUEUE
INTERACTIVE_QUEUES = (INTERACTIVE_CPU_QUEUE, INTERACTIVE_GPU_QUEUE)
#: The queues of one worker serving both CPU lanes, interactive first (tests and benches
#: that run a single worker; the launcher gives each lane its own).
CPU_QUEUES_BOTH_LANES = (INTERACTIVE_CPU_QUEUE, CPU_QUEUE)


def gpu_queue(gpu: str) -> str:
    """The private queue of the bulk worker pinned to GPU `gpu` (its CUDA index or UUID)."""
    return f"gpu.{gpu}"


def multi_gpu_queue(gpus: int) -> str:
    """The queue of jobs that need `gpus` GPUs at once, served by workers holding that many."""
    return f"gpu.x{gpus}"


def in_lane(lane: Lane, queue: str) -> str:
    """The name of bulk queue `queue` in `lane` (interactive.gpu for gpu, say)."""
    return _INTERACTIVE_PREFIX + queue if lane == INTERACTIVE else queue


def lane_of(kind: str) -> Lane:
    """The lane a kind runs in: interactive if its spec is marked short, else bulk."""
    spec_type = KINDS.get(kind)
    return INTERACTIVE if spec_type is not None and spec_type.short else BULK


def lane_of_queue(queue: str) -> Lane:
    """The lane a queue belongs to (every queue a job was ever sent to has one)."""
    return INTERACTIVE if queue.startswith(_INTERACTIVE_PREFIX) else BULK


def queue_for(spec: Spec) -> str:
    """Route a job by its lane (its kind) and device class.

    `auto` goes to the cpu queue of its lane, which every host serves; a GPU worker also
    serves that queue when it is otherwise idle, so auto work uses GPUs where they exist.
    A gpu job that needs several GPUs goes to the queue of workers pinned to that many (on
    the CPU, several processes are just processes: its gloo run stays in the cpu queue).
    """
    lane: Lane = INTERACTIVE if type(spec).short else BULK
    if spec.device != "gpu":
        return in_lane(lane, CPU_QUEUE)
    gpus = getattr(spec, "gpus", 1)  # only kinds that can use several GPUs have the field
    return multi_gpu_queue(gpus) if gpus > 1 else in_lane(lane, GPU_QUEUE)


def lane_queues(lane: Lane, gpu_entry: str | None) -> tuple[str, ...]:
    """The queues a worker of `lane` consumes, in the order it takes them: for a GPU (or
    GPU group "0+1") its own queue, the multi-GPU queues it can serve largest first (bulk
    only), the shared gpu queue, then cpu work when idle; for the CPU, the cpu queue."""
    if gpu_entry is None:
        return (in_lane(lane, CPU_QUEUE),)
    size = len(gpu_entry.split("+"))
    multi = tuple(multi_gpu_queue(n) for n in range(size, 1, -1)) if lane == BULK else ()
    own = in_lane(lane, gpu_queue(gpu_entry))
    return (own, *multi, in_lane(lane, GPU_QUEUE), in_lane(lane, CPU_QUEUE))


def can_serve(worker_queue: str, worker_device: str | None, waiting_queue: str) -> bool:
    """Whether the worker that runs a job of `worker_queue` on `worker_device` (the job's
    recorded device: "cpu", "cuda", "cuda:0") also consumes `waiting_queue`, judged from
    the rules of lane_queues: the same lane; any worker of a lane takes its cpu queue; only
    GPU workers take its gpu queue; `gpu.x<N>` only workers already running such a job
    with at least N GPUs (the database does not record a worker's GPU count otherwise)."""
    if lane_of_queue(worker_queue) != lane_of_queue(waiting_queue):
        return False
    lane = lane_of_queue(waiting_queue)
    on_gpu = (worker_device or "").startswith("cuda")
    if waiting_queue == in_lane(lane, CPU_QUEUE):
        return True
    if waiting_queue == in_lane(lane, GPU_QUEUE):
        return on_gpu
    if waiting_queue.startswith("gpu.x") and worker_queue.startswith("gpu.x"):
        return on_gpu and int(worker_queue[5:]) >= int(waiting_queue[5:])
    return False


def parse_lanes(setting: str) -> dict[Lane, int]:
    """KILN_LANES ("bulk=1,interactive=2") as worker processes per device and lane; a lane
    not named keeps its default (one each). Raises ValueError saying what is wrong."""
    sizes: dict[Lane, int] = {BULK: 1, INTERACTIVE: 1}
    for part in filter(None, (p.strip() for p in setting.split(","))):
        name, sep, count = (s.strip() for s in part.partition("="))
        if not sep or name not in LANES:
            raise ValueError(f"{part!r} is not <lane>=<count>; lanes are {', '.join(LANES)}")
        if not count.isdigit() or int(count) > 64:
            raise ValueError(f"{name}={count!r}: the count must be a whole number 0 to 64")
        sizes[name] = int(count)
    if not any(sizes.values()):
        raise ValueError("every lane has 0 workers: nothing would run")
    return sizes
