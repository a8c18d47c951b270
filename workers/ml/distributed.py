"""Train with DistributedDataParallel in `world` spawned processes (gloo on CPU, NCCL on
CUDA), while this process relays their reports to the job and their cancellation back.

Rank 0 reports and writes checkpoints and the final weights; every rank checks a shared
stop flag each step through an all-reduce, so all ranks stop at the same step.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# CPython's own class (the process authkey's type); typeshed does not list it.
from multiprocessing.process import AuthenticationString  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from kiln.errors import JobFailure
from workers.ml import bundle
from workers.ml import checkpoint as ckpt
from workers.ml.data import Table
from workers.ml.training import FitResult, Group, Hooks, LoopConfig, StopAtStep, fit

_POLL_S = 0.2


class Stopped(Exception):
    """Raised in every rank once the parent asked the group to stop."""


@dataclass(frozen=True)
class Job:
    """Everything a rank needs, sent to it once at spawn (our own objects, not user files)."""

    model_config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    train: Table
    val: Table
    loop: LoopConfig
    device_type: str
    checkpoint: Path
    resume: Path | None
    weights_out: Path
    rendezvous: Path
    config_key: str
    #: Rank 0 publishes its saves through it (a ckpt.Publisher pickles: files and a clock).
    on_save: ckpt.OnSave | None = None


def run(job: Job, world: int, hooks: Hooks) -> FitResult:
    """Train in `world` processes; returns rank 0's result (its weights are in
    job.weights_out). A hook that raises (cancellation) stops every rank, then re-raises."""
    context = mp.get_context("spawn")
    events: Any = context.Queue()
    stop = context.Event()
    job.rendezvous.unlink(missing_ok=True)
    with _children_allowed():
        processes = mp.start_processes(
            _rank_main, args=(world, job, events, stop), nprocs=world, join=False,
            start_method="spawn",
        )  # fmt: skip
    outcome: dict[str, Any] = {}
    try:
        while not processes.join(timeout=_POLL_S):
            _relay(events, hooks, outcome)
        _relay(events, hooks, outcome)
    except BaseException as exc:
        stop.set()
        _wind_down(processes.processes, events)
        if isinstance(exc, StopAtStep):
            raise exc.cause from None  # the ranks checkpointed the step they stopped at
        raise
    if "failure" in outcome:
        raise JobFailure(outcome["failure"])
    if "stopped" in outcome:
        raise Stopped()
    return outcome["result"]


@contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a Celery pool process start the ranks.

    Its pool runs jobs in daemonic processes, which multiprocessing forbids to start
    children (so none outlive it); ranks never outlive the job (run() joins or kills them),
    so the flag is lifted while they start. Its authkey is billiard's type, which only
    billiard can pickle; the ranks get the same key as the standard library's type.
    """
    # _config is CPython's private per-process dict (typeshed omits it); see above.
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    saved = dict(config)
    config["daemon"] = False
    if "authkey" in config:
        config["authkey"] = AuthenticationString(bytes(config["authkey"]))
    try:
        yield
    finally:
        config.clear()
        config.update(saved)


def _wind_down(processes: list[Any], events: Any, grace_s: float = 30.0) -> None:
    """Wait for the ranks to stop, reading their queue meanwhile (a rank cannot exit while
    its queued messages are unread); kill any still running after `grace_s`."""
    deadline = time.monotonic() + grace_s
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        _discard(events)
        for process in processes:
            process.join(timeout=_POLL_S / len(processes))
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()


def _discard(events: Any) -> None:
    try:
        while True:
            events.get_nowait()
    except queue.Empty:
        return


def _relay(events: Any, hooks: Hooks, outcome: dict[str, Any]) -> None:
    """Hand rank 0's reports to the hooks, here in the process that owns the job."""
    while True:
        try:
            kind, *payload = events.get_nowait()
        except queue.Empty:
            return
        if kind == "step":
            hooks.step(*payload)
        elif kind == "epoch":
            hooks.epoch(*payload)
        elif kind == "step_loss":
            hooks.step_loss(*payload)
        elif kind == "log":
            hooks.log(*payload)
        else:
            outcome[kind] = payload[0]


def _rank_main(rank: int, world: int, job: Job, events: Any, stop: Any) -> None:
    """One rank: join the group, train, and (rank 0) report and save the weights."""
    cuda = job.device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:  # share the cores instead of each rank taking them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{job.rendezvous}", rank=rank, world_size=world
    )
    if rank == 0:
        events.put(("log", f"{dist.get_world_size()} processes joined the {backend} group"))
    try:
        _train_rank(rank, world, job, events, stop, device)
    except Stopped:
        if rank == 0:
            events.put(("stopped", True))
    except JobFailure as exc:
        if rank == 0:
            events.put(("failure", str(exc)))
    except Exception:
        events.put(("log", f"rank {rank} failed: {traceback.format_exc(limit=5)}"))
        raise
    finally:
        # Free the DDP wrapper (held in reference cycles) while the interpreter is whole:
        # freed at exit instead, gloo's threads abort the rank (SIGABRT) about one run in
        # ten when its peer is still in the group.
        gc.collect()
        dist.destroy_process_group()


def _train_rank(
    rank: int, world: int, job: Job, events: Any, stop: Any, device: torch.device
) -> None:
    model = bundle.build(job.model_config)
    model.load_state_dict(job.model_state)
    model.to(device)
    report = rank == 0
    flag = torch.zeros(1, device=device)

    def step(epoch: int, index: int, steps: int) -> None:
        flag.fill_(1.0 if stop.is_set() else 0.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise StopAtStep(Stopped())  # rank 0 checkpoints this step first
        if report:
            events.put(("step", epoch, index, steps))

    def send(kind: str) -> Callable[..., None]:
        return lambda *payload: events.put((kind, *payload)) if report else None

    hooks = Hooks(step=step, epoch=send("epoch"), step_loss=send("step_loss"), log=send("log"))
    resume = ckpt.load(job.resume) if job.resume is not None else None
    result = fit(
        model, job.train, job.val, job.loop, device, hooks, job.checkpoint, resume,
        Group(rank, world), job.config_key, job.on_save,
    )  # fmt: skip
    if report:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(job.weights_out))
        events.put(("result", result))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the weights rank 0 wrote into the parent's copy of the model."""
    model.load_state_dict(load_file(str(path)))
