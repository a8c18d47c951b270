"""Seconds per epoch of a Kiln train job beside a plain PyTorch loop doing the same work.

The Kiln side is the real train runner through workers.execute.execute_attempt, with a real
RunContext on a real SQLite database in a temp folder (metrics, progress, cancellation
checks, an atomic checkpoint per epoch, registration). It runs in this process, so no
broker or worker start-up is counted. The plain side is a hand-written loop: same model,
data split, optimizer, schedule, batch size, thread count, and a validation pass per epoch.

    PYTHONPATH=. python bench/train_overhead.py [--epochs 20] [--repeats 5] [--threads 1]

Prints seconds per epoch for each side and the ratio (target: at most 1.10), two ways:
- the whole job divided by its epochs: the best of the interleaved repeats (least
  disturbed by other processes on a shared machine), the median, process CPU time, and
  the median of the repeats' own ratios (paired: each repeat runs both sides back to back);
- marginal: from the best runs of --base-epochs and of --epochs epochs, what each further
  epoch costs (the slope) and what a job costs once, whatever its length (the intercept:
  for Kiln the claim, registration, and their commits and fsyncs).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from db import jobs, migrate
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Job
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from workers.execute import execute_attempt
from workers.ml import bundle, data
from workers.runtime import Runtime

#: The two setups measured: the tabular MLP (short epochs, where per-epoch bookkeeping
#: weighs most) and the image CNN.
ARCHS = {
    "mlp": ("digits", {"arch": "mlp", "hidden": [128, 64], "dropout": 0.1}),
    "cnn": (
        "digits_images",
        {"arch": "cnn", "channels": [32, 64], "kernel_size": 3, "dropout": 0.1},
    ),
}
SPEC: dict = {
    "model_name": "bench",
    "batch_size": 64,
    "lr": 3e-3,
    "optimizer": "adam",
    "lr_schedule": "cosine",
    "device": "cpu",
}


def use(arch: str) -> None:
    """Point SPEC (shared by both sides) at one of ARCHS."""
    dataset, params = ARCHS[arch]
    SPEC.update(dataset=f"builtin:{dataset}", arch=arch, arch_params=params)


Timing = tuple[float, float]  # (wall seconds, process CPU seconds) per epoch


def _no_resend(job: Job, countdown: float) -> None:
    raise SystemExit(f"the Kiln job {job.id} was re-queued; the measurement is void")


def kiln_epoch_s(runtime: Runtime, epochs: int) -> Timing:
    """Run one train job to completion; seconds per epoch of the whole job."""
    with session_scope(runtime.sessions) as session:
        job = jobs.create(
            session, kind="train", owner="bench", spec={**SPEC, "epochs": epochs}, queue="cpu"
        )
        session.flush()
        job_id = job.id
    started, cpu = time.perf_counter(), time.process_time()
    execute_attempt(runtime, job_id, 0, worker="bench", send=_no_resend)
    elapsed, cpu_used = time.perf_counter() - started, time.process_time() - cpu
    with session_scope(runtime.sessions) as session:
        state = session.get(Job, job_id).state  # type: ignore[union-attr]
    if state != "succeeded":
        raise SystemExit(f"the Kiln job ended {state}")
    return elapsed / epochs, cpu_used / epochs


def plain_epoch_s(epochs: int) -> Timing:
    """The same training as a plain PyTorch loop; seconds per epoch, data loading included."""
    started, cpu = time.perf_counter(), time.process_time()
    table = data.builtin(SPEC["dataset"].removeprefix("builtin:"))
    train, val = data.split(table, 0.2, seed=0)
    torch.manual_seed(0)
    config = {
        "arch": SPEC["arch"],
        "arch_params": SPEC["arch_params"],
        "feature_names": table.feature_names,
        "label_names": table.label_names,
        "input_shape": list(table.shape),
    }
    model = bundle.build(config)
    mean, std = data.normalisation(train.features)
    model.mean.copy_(torch.tensor(mean))
    model.std.copy_(torch.tensor(std))
    x, y = torch.from_numpy(train.features), torch.from_numpy(train.targets)
    vx, vy = torch.from_numpy(val.features), torch.from_numpy(val.targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(0)
    size = SPEC["batch_size"]
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), size):
            rows = order[start : start + size]
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        schedule.step()
        model.eval()
        with torch.no_grad():
            logits = model(vx)
            nn.functional.cross_entropy(logits, vy).item()
            (logits.argmax(1) == vy).float().mean().item()
    return (time.perf_counter() - started) / epochs, (time.process_time() - cpu) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--base-epochs", type=int, default=5, help="the short run of the slope")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="mlp")
    args = parser.parse_args()
    use(args.arch)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=Path(folder), redis_url="memory://")
        migrate.upgrade(settings.resolved_database_url)
        engine = make_engine(settings.resolved_database_url)
        runtime = Runtime(
            settings, make_sessionmaker(engine), ArtifactStore(settings.artifacts_dir)
        )
        # Warm-up: first-use imports (torch's optimizer pulls in torch._dynamo) are per
        # process, not per epoch.
        plain_epoch_s(1)
        kiln_epoch_s(runtime, 1)
        # As a worker's pool process does at start (workers.main): the start-up objects
        # leave the cyclic collector's sight, so no full collection (0.1-0.25 s here, both
        # sides' objects alike) lands in one side's run at random.
        gc.freeze()
        lengths = (args.base_epochs, args.epochs)
        runs: dict[tuple[str, int], list[Timing]] = {
            (side, n): [] for side in ("plain", "kiln") for n in lengths
        }
        # Interleaved, so machine noise hits both sides; which side goes first alternates,
        # so neither always runs in the wake of the other.
        sides = [("plain", plain_epoch_s), ("kiln", partial(kiln_epoch_s, runtime))]
        for repeat in range(args.repeats):
            for n in lengths:
                for side, run in sides[:: 1 if repeat % 2 == 0 else -1]:
                    runs[side, n].append(run(n))
        engine.dispose()
    plain, kiln = runs["plain", args.epochs], runs["kiln", args.epochs]
    print(f"arch={args.arch} threads={args.threads} epochs={args.epochs} repeats={args.repeats}")
    print("Kiln side: train runner via execute_attempt, real RunContext on SQLite")
    for label, pick, column in (
        ("best wall", min, 0),
        ("median wall", statistics.median, 0),
        ("best CPU", min, 1),
    ):
        p, k = pick(t[column] for t in plain), pick(t[column] for t in kiln)
        print(
            f"{label:>12}: plain {p * 1000:7.1f} ms/epoch  Kiln {k * 1000:7.1f} ms/epoch  "
            f"ratio {k / p:.3f}"
        )
    # Each repeat ran the two sides back to back, so a ratio within a repeat cancels the
    # machine's slower and faster spells, which the ratios of bests and medians do not.
    paired = sorted(k[0] / p[0] for p, k in zip(plain, kiln, strict=True))
    print(
        f"{'paired':>12}: median of the {len(paired)} repeats' ratios "
        f"{statistics.median(paired):.3f}  (lowest {paired[0]:.3f}, highest {paired[-1]:.3f})"
    )
    slope, intercept = {}, {}
    for side in ("plain", "kiln"):
        short, full = (min(t[0] for t in runs[side, n]) * n for n in lengths)
        slope[side] = (full - short) / (args.epochs - args.base_epochs)
        intercept[side] = full - slope[side] * args.epochs
    print(
        f"{'marginal':>12}: plain {slope['plain'] * 1000:7.1f} ms/epoch  Kiln "
        f"{slope['kiln'] * 1000:7.1f} ms/epoch  ratio {slope['kiln'] / slope['plain']:.3f}  "
        f"(best {args.base_epochs}- and {args.epochs}-epoch runs)"
    )
    print(
        f"{'once per job':>12}: plain {intercept['plain'] * 1000:7.1f} ms        Kiln "
        f"{intercept['kiln'] * 1000:7.1f} ms"
    )
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    main()
