"""Scale-out of a sharded batch job: the same batch_predict job (`shards: auto`) with one
worker, then with two.

    KILN_REDIS_URL=redis://127.0.0.1:6379 python bench/scale_out.py [--rows 1000000]

Each worker is a real Celery worker process limited to one torch thread (OMP_NUM_THREADS=1),
so a 2-core machine can run two side by side. With one live worker `auto` is one shard and
the job scores every row itself; with two it splits into two shards, one per worker, and
then joins their outputs. Figures are rows/s from sending the job to its finished output
file (the best of --rounds runs each, after a warm-up job on every worker), and whether the
two outputs are the same file (their digests). Target: speed-up >= 1.8x, identical output.
The speed-up is printed last, as `speed-up: N.NNx`.
"""

from __future__ import annotations

import argparse
import os
from contextlib import ExitStack

from inference_kit import Kiln

BATCH_SIZE = 4096
CHUNK_ROWS = 16_384  # the spec default
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _spec(dataset: str) -> dict[str, object]:
    return {"model": "bench", "dataset": dataset, "passthrough": ["id"], "shards": "auto",
            "batch_size": BATCH_SIZE, "chunk_rows": CHUNK_ROWS}  # fmt: skip


def _rounds(kiln: Kiln, dataset: str, rounds: int) -> tuple[float, str, list[int]]:
    """Best seconds of `rounds` jobs, the output's digest (the same every round), and the
    shards each round's job split into."""
    best, digests, shards = float("inf"), set(), []
    for _ in range(rounds):
        [job] = kiln.insert("batch_predict", [_spec(dataset)])
        best = min(best, kiln.run([job]))
        result = kiln.result(job)
        digests.add(result["output"]["digest"])
        shards.append(int(result.get("shards", 1)))
    if len(digests) != 1:
        raise RuntimeError(f"rounds wrote different outputs: {digests}")
    return best, digests.pop(), shards


def _warm(kiln: Kiln, dataset: str, workers: int) -> None:
    """One small unsharded job per worker, sent at once so that each worker takes one: a
    fresh process's first job faults in its memory and loads the model."""
    jobs = kiln.insert("batch_predict", [{"model": "bench", "dataset": dataset}] * workers)
    kiln.run(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the job")
    parser.add_argument("--rounds", type=int, default=2, help="runs with each worker count")
    args = parser.parse_args()
    kiln = Kiln(redis_db=14)
    try:
        kiln.register_model()
        dataset, _ = kiln.dataset(args.rows)
        warm_set, _ = kiln.dataset(100_000)
        with ExitStack() as workers:
            workers.enter_context(kiln.worker("w1", **ONE_THREAD))
            _warm(kiln, warm_set, 1)
            one_s, one_digest, one_shards = _rounds(kiln, dataset, args.rounds)
            workers.enter_context(kiln.worker("w2", **ONE_THREAD))
            _warm(kiln, warm_set, 2)
            two_s, two_digest, two_shards = _rounds(kiln, dataset, args.rounds)
        one_rate, two_rate = args.rows / one_s, args.rows / two_s
        print(
            f"rows={args.rows} chunk_rows={CHUNK_ROWS} batch_size={BATCH_SIZE} "
            f"cores={os.cpu_count()} torch_threads_per_worker=1 rounds={args.rounds}"
        )
        print(f"1 worker:  {one_rate:10,.0f} rows/s ({one_s:.2f} s, shards={one_shards})")
        print(f"2 workers: {two_rate:10,.0f} rows/s ({two_s:.2f} s, shards={two_shards})")
        same = one_digest == two_digest
        print(f"assembled output identical to the 1-worker output: {same} "
              f"({two_digest[:16]}{'' if same else ' vs ' + one_digest[:16]})")  # fmt: skip
        if not same:
            raise SystemExit("the outputs differ")
        print(f"speed-up: {two_rate / one_rate:.2f}x")
    finally:
        kiln.close()


if __name__ == "__main__":
    main()
