"""batch_predict retry_of against rescoring everything: the cost of fixing a few bad rows.

    KILN_REDIS_URL=redis://127.0.0.1:6379 python bench/retry_rows.py [--rows 1000000] [--bad 5]

Flushes database 8 of that Redis. Writes a Parquet dataset of `rows` rows with `bad` rows
that cannot be scored (NaN), scores it with a batch_predict job (max_error_fraction lets
them through into the error file), uploads the corrected dataset, then times, on the same
warm worker: (1) a retry_of job (reads the dataset once to pick the rows, scores them,
streams the first job's output into a merged one) and (2) a plain job scoring the whole
corrected dataset. Prints both in seconds and their ratio (1)/(2), and checks that the
two outputs hold the same predictions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from inference_kit import WIDTH, Kiln

from kiln import datasets

SCHEMA = pa.schema([("id", pa.int64())] + [(f"f{i}", pa.float32()) for i in range(WIDTH)])


def _write(path: Path, rows: int, bad: np.ndarray) -> None:
    """The dataset (the same values for the same `rows`), with NaN in the `bad` rows."""
    rng = np.random.default_rng(rows)
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            features = rng.normal(size=(n, WIDTH)).astype(np.float32)
            features[bad[(bad >= start) & (bad < start + n)] - start, 0] = np.nan
            columns = {"id": pa.array(np.arange(start, start + n))}
            columns |= {f"f{i}": pa.array(features[:, i]) for i in range(WIDTH)}
            writer.write_table(pa.table(columns, schema=SCHEMA))


def _predictions(kiln: Kiln, job_id: str) -> list[str | None]:
    output = kiln.result(job_id)["output"]
    path = kiln.store.path(output["digest"])
    table = pa.Table.from_batches(list(datasets.iter_batches(path, "parquet", 1_000_000)))
    return table["prediction"].to_pylist()  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--bad", type=int, default=5)
    args = parser.parse_args()
    kiln = Kiln(redis_db=8)
    try:
        kiln.register_model()
        bad = np.sort(np.random.default_rng(0).choice(args.rows, args.bad, replace=False))
        paths = {name: kiln.folder / f"{name}.parquet" for name in ("broken", "fixed")}
        _write(paths["broken"], args.rows, bad)
        _write(paths["fixed"], args.rows, bad[:0])
        broken, fixed = (kiln.text_dataset(paths[name]) for name in ("broken", "fixed"))
        spec = {"model": "bench", "passthrough": ["id"], "max_error_fraction": 0.01}
        with kiln.worker():
            [source] = kiln.insert("batch_predict", [{**spec, "dataset": broken}])
            kiln.run([source])
            assert kiln.result(source)["errors"] == args.bad
            [retry] = kiln.insert("batch_predict", [{**spec, "dataset": fixed, "retry_of": source}])
            retry_s = kiln.run([retry])
            [full] = kiln.insert("batch_predict", [{**spec, "dataset": fixed}])
            full_s = kiln.run([full])
        same = _predictions(kiln, retry) == _predictions(kiln, full)
        print(f"rows={args.rows} bad={args.bad}")
        print(f"(1) retry_of job: {retry_s:.2f} s ({kiln.result(retry)['retried']} rows scored)")
        print(f"(2) full rescore: {full_s:.2f} s")
        print(f"ratio (1)/(2): {retry_s / full_s:.3f}; same predictions: {same}")
    finally:
        kiln.close()


if __name__ == "__main__":
    main()
