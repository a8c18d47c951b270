"""Batch scoring throughput and memory: a batch_predict job against raw PyTorch and against one
Celery task per row.

    KILN_REDIS_URL=redis://127.0.0.1:6379 python bench/batch_scoring.py [--rows 200000]

Prints rows/s of (1) a batch_predict job from submission to its finished output file, run by
a real worker; (a) a raw PyTorch loop over the same rows in memory, same model, batch size
and threads; (b) single-row predict jobs, one Celery task each, batching off. Then the peak
RSS of the worker's process tree during jobs of 10^5 and 10^6 rows (a fresh worker each).
Targets: (1)/(a) >= 0.90, (1)/(b) >= 20, RSS(10^6)/RSS(10^5) <= 1.3.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from inference_kit import WIDTH, Kiln, PeakRSS, tree_cpu_seconds

BATCH_SIZE = 4096
CHUNK_ROWS = 16_384  # the spec default


def _batch_job(kiln: Kiln, dataset: str, pid: int) -> tuple[float, float, int]:
    """Seconds from submission to the succeeded job (output stored), the CPU seconds the
    worker spent meanwhile, and the worker's peak RSS."""
    spec = {"model": "bench", "dataset": dataset, "passthrough": ["id"]}
    spec |= {"batch_size": BATCH_SIZE, "chunk_rows": CHUNK_ROWS}
    [job] = kiln.insert("batch_predict", [spec])
    cpu_before = tree_cpu_seconds(pid)
    with PeakRSS(pid) as rss:
        started = time.perf_counter()
        kiln.send([job])
        kiln.wait([job])
        elapsed = time.perf_counter() - started
    return elapsed, tree_cpu_seconds(pid) - cpu_before, rss.peak


def _raw_torch(model: torch.nn.Module, path, threads: int) -> tuple[float, float]:
    """Seconds and CPU seconds of a plain inference loop over the same rows (in memory)."""
    table = pq.read_table(path)
    features = np.column_stack([table[f"f{i}"].to_numpy() for i in range(WIDTH)])
    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    torch.set_num_threads(threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for start in range(0, len(tensor), BATCH_SIZE):
            probabilities = torch.softmax(model(tensor[start : start + BATCH_SIZE]), dim=1)
            probabilities.argmax(dim=1).numpy()
    return time.perf_counter() - started, time.process_time() - cpu_started


def _per_row(kiln: Kiln, rows: int) -> float:
    """Seconds for `rows` single-row predict jobs (one Celery task each), batching off."""
    rng = np.random.default_rng(1)
    specs = [
        {"model": "bench", "version": 1, "inputs": [rng.normal(size=WIDTH).round(4).tolist()]}
        for _ in range(rows)
    ]
    job_ids = kiln.insert("predict", specs)
    with kiln.worker(KILN_PREDICT_BATCH_MAX_ROWS="1"):
        started = time.perf_counter()
        kiln.send(job_ids)
        kiln.wait(job_ids)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows for the throughput run")
    parser.add_argument("--per-row", type=int, default=500, help="single-row jobs for (b)")
    parser.add_argument("--rss-rows", default="100000,1000000", help="sizes for the RSS run")
    args = parser.parse_args()
    kiln = Kiln(redis_db=11)
    try:
        model = kiln.register_model()
        threads = torch.get_num_threads()  # a worker process uses torch's default, as here

        dataset, path = kiln.dataset(args.rows)
        # Raw loop right before and after the job, so that both see the same machine load.
        raw = [_raw_torch(model, path, threads)]
        with kiln.worker() as worker:
            job_s, job_cpu, _ = _batch_job(kiln, dataset, worker.pid)
        raw.append(_raw_torch(model, path, threads))
        raw_s, raw_cpu = sum(r[0] for r in raw) / 2, sum(r[1] for r in raw) / 2
        per_row_s = _per_row(kiln, args.per_row)
        job_rate, raw_rate = args.rows / job_s, args.rows / raw_s
        per_row_rate = args.per_row / per_row_s
        print(f"rows={args.rows} batch_size={BATCH_SIZE} threads={threads} width={WIDTH}")
        print(f"batch_predict job {job_rate:10,.0f} rows/s ({job_s:.2f} s submit to output, "
              f"{job_cpu:.2f} CPU s)")  # fmt: skip
        print(f"(a) raw PyTorch   {raw_rate:10,.0f} rows/s ({raw_s:.2f} s forward only, "
              f"{raw_cpu:.2f} CPU s; mean of a run before and one after the job)")  # fmt: skip
        print(f"(b) task per row  {per_row_rate:10,.1f} rows/s ({args.per_row} jobs)")
        print(f"ratio vs raw PyTorch: {job_rate / raw_rate:.2f} by wall time, "
              f"{raw_cpu / job_cpu:.2f} by CPU time (target >= 0.90)")  # fmt: skip
        print(f"ratio vs task per row: {job_rate / per_row_rate:.0f}x (target >= 20x)")

        peaks = {}
        for rows in (int(r) for r in args.rss_rows.split(",")):
            dataset, _ = kiln.dataset(rows)
            with kiln.worker() as worker:
                seconds, _, peaks[rows] = _batch_job(kiln, dataset, worker.pid)
            mib = peaks[rows] / 2**20
            print(f"peak worker RSS, {rows:>9,} rows: {mib:8.1f} MiB ({seconds:.1f} s)")
        small, large = min(peaks), max(peaks)
        ratio = peaks[large] / peaks[small]
        print(f"RSS ratio {large:,} / {small:,} rows: {ratio:.2f} (target <= 1.3)")

    finally:
        kiln.close()


if __name__ == "__main__":
    main()
