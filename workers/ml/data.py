"""Datasets for training: built-in sets, uploaded tables, task inference, splits, scaling."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.errors import JobFailure

CLASSIFICATION, REGRESSION = "classification", "regression"
#: An integer target with more distinct values than this is taken as a regression target.
MAX_AUTO_CLASSES = 20


@dataclass(frozen=True)
class Table:
    """Float32 features (rows by columns), targets (int64 classes or float32 values), and
    what a model needs to know about them."""

    features: np.ndarray
    targets: np.ndarray
    feature_names: list[str]
    #: Class names in target-index order; empty for regression.
    label_names: list[str]
    task: str = CLASSIFICATION
    #: How one row is shaped for the network: [features] or [channels, height, width].
    input_shape: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.input_shape or (self.features.shape[1],)


#: Built-in name -> scikit-learn loader (the files ship inside the scikit-learn wheel).
_SKLEARN = {
    "digits": "load_digits",
    "iris": "load_iris",
    "wine": "load_wine",
    "breast_cancer": "load_breast_cancer",
    "diabetes": "load_diabetes",
}


def builtin(name: str) -> Table:
    """A dataset that ships inside scikit-learn (never downloaded)."""
    images = name == "digits_images"
    loader = _SKLEARN.get("digits" if images else name)
    if loader is None:
        raise JobFailure(f"unknown built-in dataset {name!r}")
    # Imported here: DDP ranks unpickle Tables and should not pay for scikit-learn.
    from sklearn import datasets

    bunch = getattr(datasets, loader)()
    features = bunch.data.astype(np.float32)
    names = list(getattr(bunch, "feature_names", [])) or []
    if name.startswith("digits"):
        names = [f"pixel_{i}" for i in range(features.shape[1])]
    if name == "diabetes":
        return Table(features, bunch.target.astype(np.float32), names, [], REGRESSION)
    return Table(
        features=features,
        targets=bunch.target.astype(np.int64),
        feature_names=names,
        label_names=[str(label) for label in bunch.target_names],
        input_shape=(1, 8, 8) if images else (),
    )


def from_arrow(table: pa.Table, target: str, task: str = "auto") -> Table:
    """Split an Arrow table into numeric features and a target column."""
    _require_target(table, target)
    feature_names = [name for name in table.column_names if name != target]
    not_numeric = [n for n in feature_names if not _is_numeric(table[n].type)]
    if not_numeric:
        raise JobFailure(f"feature columns must be numeric; these are not: {not_numeric}")
    if not feature_names:
        raise JobFailure("the dataset has no feature columns besides the target")
    features = np.column_stack(
        [table[n].to_numpy(zero_copy_only=False).astype(np.float32) for n in feature_names]
    )
    if np.isnan(features).any():
        raise JobFailure("feature columns have missing values")
    return with_target(features, feature_names, table[target], target, task)


def text_column(table: pa.Table, column: str, target: str) -> list[str]:
    """The strings of a text column (for the text architecture)."""
    _require_target(table, target)
    if column not in table.column_names:
        raise JobFailure(
            f"text column {column!r} is not in the dataset; columns: {table.column_names}"
        )
    texts = pc.cast(table[column], pa.string()).to_pylist()
    if any(text is None for text in texts):
        raise JobFailure(f"text column {column!r} has empty values")
    return texts


def with_target(
    features: np.ndarray, feature_names: list[str], column: pa.ChunkedArray, name: str, task: str
) -> Table:
    """Features plus the target column, encoded for `task` (inferred when auto)."""
    if column.null_count:
        raise JobFailure(f"target column {name!r} has empty values")
    task = infer_task(column) if task == "auto" else task
    if task == REGRESSION:
        if not _is_numeric(column.type):
            raise JobFailure(f"a regression target must be numeric; {name!r} is {column.type}")
        values = column.to_numpy(zero_copy_only=False).astype(np.float32)
        return Table(features, values, feature_names, [], REGRESSION)
    labels = _label_strings(column)
    label_names = sorted(set(labels), key=_natural)
    index = {label: i for i, label in enumerate(label_names)}
    targets = np.array([index[label] for label in labels], dtype=np.int64)
    return Table(features, targets, feature_names, label_names, CLASSIFICATION)


def infer_task(column: pa.ChunkedArray) -> str:
    """Regression for fractional floats or many distinct integers; otherwise classification."""
    if pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False)
        if not np.all(np.mod(values, 1) == 0):
            return REGRESSION
    elif not pa.types.is_integer(column.type):
        return CLASSIFICATION
    distinct = len(pc.unique(column))
    return REGRESSION if distinct > MAX_AUTO_CLASSES else CLASSIFICATION


def _label_strings(column: pa.ChunkedArray) -> list[str]:
    if pa.types.is_floating(column.type):
        # 1.0 and 2.0 read as "1" and "2", the names a user expects back from predict.
        return [str(int(v)) if float(v).is_integer() else str(v) for v in column.to_pylist()]
    return [str(v) for v in pc.cast(column, pa.string()).to_pylist()]


def _natural(label: str) -> tuple[int, float | str]:
    """Numbers in numeric order ("2" before "10"), then words alphabetically."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def _require_target(table: pa.Table, target: str) -> None:
    if target not in table.column_names:
        raise JobFailure(
            f"target column {target!r} is not in the dataset; columns: {table.column_names}"
        )


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def split(table: Table, val_fraction: float, seed: int) -> tuple[Table, Table]:
    """A seeded random split into train and validation rows."""
    order = np.random.default_rng(seed).permutation(len(table.targets))
    n_val = max(1, round(len(order) * val_fraction))
    if n_val >= len(order):
        raise JobFailure("too few rows to hold out a validation split")
    return _take(table, order[n_val:]), _take(table, order[:n_val])


def _take(table: Table, rows: np.ndarray) -> Table:
    return replace(table, features=table.features[rows], targets=table.targets[rows])


def normalisation(features: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-column mean and std of the training rows (std 1 where a column is constant)."""
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std[std < 1e-6] = 1.0
    return mean.tolist(), std.tolist()


def target_scale(table: Table) -> tuple[float, float]:
    """Mean and std of a regression target; the network learns the standardised value."""
    std = float(table.targets.std())
    return float(table.targets.mean()), std if std > 1e-6 else 1.0
