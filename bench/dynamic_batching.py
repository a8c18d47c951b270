"""Dynamic batching: many single-row predict jobs submitted at once, with batching and without.

    KILN_REDIS_URL=redis://127.0.0.1:6379 python bench/dynamic_batching.py [--jobs 2000]

All jobs are inserted first, then their messages sent in one burst to a real worker (warmed
up, model not yet loaded); the clock runs from the first send to the last job finished.
Target: jobs/s with batching >= 5x jobs/s with batching off (KILN_PREDICT_BATCH_MAX_ROWS=1).
"""

from __future__ import annotations

import argparse

import numpy as np
from inference_kit import WIDTH, Kiln


def _run(kiln: Kiln, jobs: int, **worker_env: str) -> tuple[float, int]:
    """Seconds for `jobs` single-row jobs, and how many forward passes they took."""
    rng = np.random.default_rng(jobs)
    specs = [
        {"model": "bench", "inputs": [rng.normal(size=WIDTH).round(4).tolist()]}
        for _ in range(jobs)
    ]
    job_ids = kiln.insert("predict", specs)
    with kiln.worker(**worker_env):
        elapsed = kiln.run(job_ids)
    leaders = [r for r in map(kiln.result, job_ids) if "batched_with" not in r]
    passes = sum(r.get("batch_passes", 1) for r in leaders)
    return elapsed, passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    kiln = Kiln(redis_db=13)
    try:
        kiln.register_model()

        batched_s, batched_passes = _run(kiln, args.jobs)
        single_s, single_passes = _run(kiln, args.jobs, KILN_PREDICT_BATCH_MAX_ROWS="1")
        batched, single = args.jobs / batched_s, args.jobs / single_s
        print(f"jobs={args.jobs} (one row each)")
        print(f"batching on   {batched:9.1f} jobs/s  ({batched_s:.1f} s, {batched_passes} passes)")
        print(f"batching off  {single:9.1f} jobs/s  ({single_s:.1f} s, {single_passes} passes)")
        print(f"speed-up: {batched / single:.1f}x (target >= 5x)")
    finally:
        kiln.close()


if __name__ == "__main__":
    main()
