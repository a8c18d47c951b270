"""Lanes and preemption, measured with real worker processes started as the launcher plans
them for one CPU device (a bulk worker and an interactive worker, with their threads).

    KILN_REDIS_URL=redis://127.0.0.1:6379 PYTHONPATH=. python bench/lanes.py \
        [--predicts 40] [--epochs 8]

Prints:
- predict latency (send -> finished_at, single-row predicts one after another), p50 and
  p99, with the device idle and while a train job runs on it (goal: p99 while training at
  most 2x idle);
- training throughput: the same train job's seconds per epoch alone and while predicts are
  served beside it (goal: while-serving at least 0.85 of alone);
- preemption delay: a priority-9 train job sent while a priority-0 one runs on the only
  bulk worker, from its send to its start (the scheduler's sweep runs every 0.2 s here,
  with KILN_PREEMPT_AFTER_S=0), beside the running job's seconds per epoch.
It is a benchmark, not a test: figures depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.inference_kit import ROOT, WIDTH, Kiln
from db import jobs
from db.base import utcnow
from db.models import Job
from kiln import routing
from kiln.broker import send_run
from kiln.specs import parse_spec
from workers import preempt
from workers.launch import plan

TRAIN = {
    "dataset": "builtin:digits",
    "arch_params": {"hidden": [128, 64]},
    "batch_size": 32,
    "device": "cpu",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predicts", type=int, default=40, help="predicts per measurement")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the train jobs")
    parser.add_argument("--redis-db", type=int, default=14)
    args = parser.parse_args()
    kiln = Kiln(args.redis_db)
    kiln.register_model()
    try:
        with lane_workers(kiln):
            run(kiln, args)
    finally:
        kiln.close()


def run(kiln: Kiln, args: argparse.Namespace) -> None:
    predict(kiln)  # loads the model into the interactive worker's cache
    idle = [predict(kiln) for _ in range(args.predicts)]

    alone = train_seconds_per_epoch(kiln, submit(kiln, "train", train_spec(args.epochs)))
    busy_job = submit(kiln, "train", train_spec(args.epochs))
    wait_state(kiln, busy_job, "running")
    during: list[float] = []
    while state(kiln, busy_job) == "running":
        during.append(predict(kiln))
    serving = train_seconds_per_epoch(kiln, busy_job)

    low = submit(kiln, "train", train_spec(args.epochs * 4), priority=0)
    wait_state(kiln, low, "running")
    time.sleep(2 * alone)  # a couple of epochs in
    sent = utcnow()
    high = submit(kiln, "train", train_spec(2), priority=9)
    deciding = kiln.settings.model_copy(update={"preempt_after_s": 0.0})
    while state(kiln, high) == "queued":
        preempt.sweep(kiln.sessions, deciding)
        time.sleep(0.2)
    with kiln.sessions() as session:
        started = session.get(Job, high).started_at  # type: ignore[union-attr]
    assert started is not None
    delay = (started - sent).total_seconds()
    kiln.wait([high, low], timeout_s=3600)
    preemptions = row(kiln, low).preemptions

    p50_idle, p99_idle = percentiles(idle)
    p50_busy, p99_busy = percentiles(during)
    line = "predict latency, {:<16} p50 {:7.1f} ms   p99 {:7.1f} ms   ({} predicts)"
    print(line.format("device idle:", p50_idle * 1e3, p99_idle * 1e3, len(idle)))
    print(line.format("while training:", p50_busy * 1e3, p99_busy * 1e3, len(during)))
    print(f"  p99 ratio while training / idle:   {p99_busy / p99_idle:.2f}   (goal <= 2)")
    print(f"training s/epoch alone {alone:.3f}, while serving predicts {serving:.3f}")
    print(f"  throughput ratio serving / alone:  {alone / serving:.2f}   (goal >= 0.85)")
    print(
        f"preemption delay (send -> start):    {delay:.2f} s   vs one epoch {alone:.2f} s   "
        f"(preemptions of the low job: {preemptions})"
    )


def train_spec(epochs: int) -> dict[str, Any]:
    return {**TRAIN, "model_name": f"lanes-{epochs}", "epochs": epochs}


def predict(kiln: Kiln) -> float:
    """One single-row predict: seconds from its send to its finished_at."""
    job_id = submit(kiln, "predict", {"model": "bench", "inputs": [[0.5] * WIDTH]}, send_now=False)
    started = utcnow()
    send(kiln, job_id)
    return (kiln.wait([job_id], timeout_s=600) - started).total_seconds()


def submit(
    kiln: Kiln, kind: str, spec: dict[str, Any], priority: int = 0, send_now: bool = True
) -> str:
    """Insert a job routed as POST /jobs routes it, and send it unless told not to."""
    with kiln.sessions() as session:
        job = jobs.create(
            session,
            kind=kind,
            owner="bench",
            spec=spec,
            queue=routing.queue_for(parse_spec(kind, spec)),
            priority=priority,
        )
        session.commit()
        job_id = job.id
    if send_now:
        send(kiln, job_id)
    return job_id


def send(kiln: Kiln, job_id: str) -> None:
    job = row(kiln, job_id)
    send_run(kiln.celery, job.id, job.attempt, job.queue, job.priority)
    with kiln.sessions() as session:
        jobs.mark_sent(session, job.id, job.attempt)
        session.commit()


def row(kiln: Kiln, job_id: str) -> Job:
    with kiln.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def state(kiln: Kiln, job_id: str) -> str:
    return row(kiln, job_id).state


def wait_state(kiln: Kiln, job_id: str, wanted: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while state(kiln, job_id) != wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} never became {wanted}")
        time.sleep(0.05)


def train_seconds_per_epoch(kiln: Kiln, job_id: str) -> float:
    kiln.wait([job_id], timeout_s=3600)
    job = row(kiln, job_id)
    assert job.started_at is not None
    assert job.finished_at is not None
    return (job.finished_at - job.started_at).total_seconds() / job.spec["epochs"]


def percentiles(values: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), cuts[98]


@contextmanager
def lane_workers(kiln: Kiln) -> Iterator[None]:
    """The CPU device's workers exactly as workers.launch.plan gives them (queues and
    thread counts), each ready once it has run an echo of its own lane."""
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KILN_DATABASE_URL": kiln.settings.database_url,
        "KILN_REDIS_URL": kiln.settings.redis_url,
        "KILN_DATA_DIR": str(kiln.settings.data_dir),
    }
    processes = []
    for worker in plan([], 1):
        log = (kiln.folder / f"{worker.name}.log").open("ab")
        processes.append(
            subprocess.Popen(
                worker.argv(), cwd=ROOT, env={**environ, **worker.env}, stdout=log, stderr=log
            )
        )
        print(f"worker {worker.name}: queues {','.join(worker.queues)}, "
              f"{worker.env['OMP_NUM_THREADS']} torch threads", file=sys.stderr)  # fmt: skip
    try:
        warm = [submit(kiln, "echo", {"message": "warm"})]
        warm.append(submit(kiln, "train", train_spec(1)))
        kiln.wait(warm, timeout_s=300)
        yield
    finally:
        threads = []
        for process in processes:
            process.send_signal(signal.SIGTERM)
            threads.append(threading.Thread(target=process.wait, kwargs={"timeout": 60}))
            threads[-1].start()
        for thread in threads:
            thread.join()


if __name__ == "__main__":
    main()
