"""Scale-out of a sharded batch job: the same batch_predict job (`shards: auto`) with one
worker, then with two.

    KILN_REDIS_URL=redis://127.0.0.1:6379 python bench/scale_out.py [--rows 1000000]

Each worker is a real Celery worker process limited to one torch thread (OMP_NUM_THREADS=1),
so a 2-core machine can run two side by side. With one live worker `auto` is one shard and
the job scores every row itself; with two it splits into two shards, one per worker, and
then joins their outputs. The second worker is started for each 2-worker run and stopped
after it (a clean stop withdraws its presence record, so `auto` sees one worker again):
the runs alternate, so a slow spell of a shared host slows both figures rather than one.
Figures are rows/s from sending the job to its finished output file (the best of --rounds
runs each, after a warm-up job on every worker), and whether the two outputs are the same
file (their digests). Target: speed-up >= 1.8x, identical output. The speed-up is printed
last, as `speed-up: N.NNx`.

Each run also prints the CPU time the host took from this machine meanwhile (steal, on a
virtual machine): it slows two busy workers more than one, which the kernel moves to the
CPU that is running, so a run with steal understates the speed-up.

Beside each pair of runs, the host's own ceiling: a raw PyTorch loop (Parquet in, the same
model and batch size, one torch thread, Parquet out) over every row in one process, then
over half the rows in each of two processes at once. A host whose second core is slower
when both are busy (a shared VM's neighbours, a clock that drops with two busy cores)
holds this figure under 2x too; Kiln's speed-up divided by it is what Kiln itself loses.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pyarrow.parquet as pq
from inference_kit import CONFIG, WIDTH, Kiln, raw_score

BATCH_SIZE = 4096
CHUNK_ROWS = 16_384  # the spec default
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _spec(dataset: str) -> dict[str, object]:
    return {"model": "bench", "dataset": dataset, "passthrough": ["id"], "shards": "auto",
            "batch_size": BATCH_SIZE, "chunk_rows": CHUNK_ROWS}  # fmt: skip


class Run(NamedTuple):
    seconds: float
    digest: str
    shards: int
    #: The share of CPU time the host took from this machine during the run.
    steal: float


def _once(kiln: Kiln, dataset: str) -> Run:
    """One job: its seconds, its output's digest and the shards it split into."""
    [job] = kiln.insert("batch_predict", [_spec(dataset)])
    before = psutil.cpu_times()
    seconds = kiln.run([job])
    after = psutil.cpu_times()
    stolen = getattr(after, "steal", 0.0) - getattr(before, "steal", 0.0)
    total = sum(after) - sum(before)
    result = kiln.result(job)
    shards = int(result.get("shards", 1))
    return Run(seconds, result["output"]["digest"], shards, stolen / total if total else 0.0)


def _raw_loop(path: Path, half: str) -> None:
    """A raw loop's process (run as `scale_out.py --raw PATH HALF`): the model the bench
    registers (seed 0), built by hand; after a line on stdin, the rows of `half` (all, first
    or second: whole row groups) read, scored and written; then its seconds on stdout."""
    import torch

    from workers import malloc
    from workers.ml import bundle

    malloc.keep_freed_memory()  # as a worker process does (and MIMALLOC_ALLOW_THP, below)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = bundle.build(CONFIG).eval()
    source = pq.ParquetFile(path)
    groups = list(range(source.num_row_groups))
    middle = len(groups) // 2
    groups = {"all": groups, "first": groups[:middle], "second": groups[middle:]}[half]
    with torch.inference_mode():  # a warm process, as a worker's after its warm-up job
        for _ in range(3):
            model(torch.zeros(BATCH_SIZE, WIDTH)).softmax(dim=1).max(dim=1)
    sys.stdin.readline()
    started = time.perf_counter()
    chunks = source.iter_batches(batch_size=CHUNK_ROWS, row_groups=groups)
    raw_score(model, chunks, path.with_suffix(f".raw-{half}.parquet"), BATCH_SIZE)
    print(time.perf_counter() - started, flush=True)


def _raw(path: Path, halves: list[str]) -> float:
    """Seconds of raw loops over `halves` of the dataset, one process each, started at once
    (after their imports): the slowest one's. They allocate memory as a worker does
    (workers/malloc.py), so that the loop differs from a shard in what Kiln adds alone."""
    env = {**os.environ, **ONE_THREAD, "MIMALLOC_ALLOW_THP": "0"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    argv = [sys.executable, __file__, "--raw", str(path)]
    processes = [
        subprocess.Popen(
            [*argv, half], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        for half in halves
    ]
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    return max(float(process.communicate()[0]) for process in processes)


def _warm(kiln: Kiln, dataset: str, workers: int) -> None:
    """One small unsharded job per worker, sent at once so that each worker takes one: a
    fresh process's first job faults in its memory and loads the model."""
    jobs = kiln.insert("batch_predict", [{"model": "bench", "dataset": dataset}] * workers)
    kiln.run(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the job")
    parser.add_argument("--rounds", type=int, default=5, help="runs with each worker count")
    parser.add_argument("--raw", nargs=2, metavar=("PATH", "HALF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:
        _raw_loop(Path(args.raw[0]), args.raw[1])
        return
    kiln = Kiln(redis_db=14)
    runs: dict[int, list[Run]] = {1: [], 2: []}
    raw: dict[int, list[float]] = {1: [], 2: []}
    try:
        kiln.register_model()
        dataset, path = kiln.dataset(args.rows)
        warm_set, _ = kiln.dataset(100_000)
        with kiln.worker("w1", **ONE_THREAD):
            _warm(kiln, warm_set, 1)
            for _ in range(args.rounds):
                raw[1].append(_raw(path, ["all"]))
                runs[1].append(_once(kiln, dataset))
                with kiln.worker("w2", **ONE_THREAD):
                    _warm(kiln, warm_set, 2)
                    runs[2].append(_once(kiln, dataset))
                raw[2].append(_raw(path, ["first", "second"]))
    finally:
        kiln.close()
    print(
        f"rows={args.rows} chunk_rows={CHUNK_ROWS} batch_size={BATCH_SIZE} "
        f"cores={os.cpu_count()} torch_threads_per_worker=1 rounds={args.rounds}"
    )
    rates = {}
    for workers, done in runs.items():
        best = min(done, key=lambda run: run.seconds)
        rates[workers] = args.rows / best.seconds
        every = ", ".join(f"{run.seconds:.2f} s (steal {run.steal:.0%})" for run in done)
        label = f"{workers} worker{'s' if workers > 1 else ''}:"
        print(f"{label:10} {rates[workers]:10,.0f} rows/s, shards={best.shards}; runs: {every}")
    digests = {run.digest for done in runs.values() for run in done}
    same = len(digests) == 1
    print(f"assembled output identical to the 1-worker output: {same} "
          f"({', '.join(d[:16] for d in sorted(digests))})")  # fmt: skip
    if not same:
        raise SystemExit("the outputs differ")
    ceiling = min(raw[1]) / min(raw[2])
    every = ", ".join(f"{one:.2f}/{two:.2f} s" for one, two in zip(raw[1], raw[2], strict=True))
    print(f"raw PyTorch loop, 2 processes against 1 (this host's ceiling): {ceiling:.2f}x; "
          f"runs: {every}")  # fmt: skip
    speed_up = rates[2] / rates[1]
    print(f"Kiln's speed-up / the raw loop's: {speed_up / ceiling:.2f}")
    print(f"speed-up: {speed_up:.2f}x")


if __name__ == "__main__":
    main()
