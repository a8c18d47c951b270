"""batch_predict's feature parsing: a record batch's feature matrix for the rows that can be
scored, and the reason each other row cannot (a missing value, NaN or infinity, a vector of
the wrong width)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def from_columns(
    batch: pa.RecordBatch, names: list[str]
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """The feature matrix, rows by features, as the transpose of a features-by-rows array:
    stacking whole columns is a quarter of the cost of scattering each into a row-major
    matrix, and a Linear layer takes the transposed layout as fast."""
    columns = [batch.column(name).to_numpy(zero_copy_only=False) for name in names]
    by_feature = np.vstack(columns).astype(np.float32, copy=False)
    finite = np.isfinite(by_feature)
    ok = finite.all(axis=0)
    reasons: dict[int, str] = {}
    for row in np.flatnonzero(~ok):
        j = int(np.flatnonzero(~finite[:, row])[0])
        column = batch.column(names[j])
        what = "a missing value" if column[int(row)].as_py() is None else f"{by_feature[j, row]}"
        reasons[int(row)] = f"column {names[j]!r} has {what}; the model needs finite numbers"
    # all(axis=0) of a 2-D array is an array; numpy's stubs allow a scalar too.
    return (by_feature if ok.all() else by_feature[:, ok]).T, ok, reasons  # type: ignore[return-value]


def from_vectors(column: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    lengths = np.nan_to_num(lengths.astype(np.float64), nan=-1).astype(np.int64)
    ok = lengths == width
    reasons = {
        int(row): "the feature vector is missing"
        if lengths[row] < 0
        else f"the row has {lengths[row]} values; the model takes {width}"
        for row in np.flatnonzero(~ok)
    }
    good = column.filter(pa.array(ok))
    matrix = good.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    matrix = matrix.reshape(-1, width)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(ok)[~finite]
        for row in rows:
            reasons[int(row)] = "the feature vector holds a missing value, NaN or infinity"
        ok[rows] = False
        matrix = matrix[finite]
    return np.ascontiguousarray(matrix), ok, reasons
