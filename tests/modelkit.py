"""Test helpers: register a small (untrained, seeded) model and an uploaded dataset directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from sqlalchemy.orm import Session, sessionmaker

from db import registry
from db.base import utcnow
from db.models import Dataset, Job
from kiln import datasets
from kiln.artifacts import ArtifactStore
from workers.ml import bundle

FEATURES = ["f0", "f1", "f2", "f3"]
LABELS = ["a", "b", "c"]


def config(width: int = len(FEATURES), hidden: list[int] | None = None) -> dict:
    names = FEATURES if width == len(FEATURES) else [f"f{i}" for i in range(width)]
    return {
        "arch": "mlp",
        "arch_params": {"hidden": hidden or [8], "dropout": 0.0},
        "feature_names": names,
        "label_names": LABELS,
    }


def slow_config() -> dict:
    """A model wide enough that a batch job runs for seconds (about 18,000 rows/s on one
    core of a 2-core VM), so a test can catch the job mid-way; a loaded machine only
    widens that window. (Not a speed check: nothing asserts on time.)"""
    return config(hidden=[2048, 2048])


def register_model(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    tmp: Path,
    owner: str = "alice",
    name: str = "m",
    cfg: dict | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict]:
    """A seeded random Classifier registered as the next version of `name`."""
    cfg = cfg or config()
    torch.manual_seed(seed)
    model = bundle.build(cfg).eval()
    path = tmp / f"weights-{name}-{seed}.safetensors"
    bundle.save(model, cfg, path)
    stored = store.put_file(path)
    with sessions() as session:
        registry.register_version(
            session,
            owner=owner,
            name=name,
            source_job_id=None,
            arch="mlp",
            config=cfg,
            metrics={},
            artifact_digest=stored.digest,
            artifact_size=stored.size,
            dataset_digest=None,
        )
        session.commit()
    return model, cfg


def add_dataset(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    path: Path,
    fmt: str,
    owner: str = "alice",
) -> str:
    """Store `path` and record it as a dataset, as an upload would; returns its id."""
    info = datasets.inspect(path, fmt)
    stored = store.put_file(path)
    with sessions() as session:
        dataset = Dataset(
            owner=owner,
            name=path.name,
            format=fmt,
            rows=info.rows,
            columns=info.columns,
            size_bytes=stored.size,
            digest=stored.digest,
            created_at=utcnow(),
        )
        session.add(dataset)
        session.commit()
        return dataset.id


def feature_table(rows: int, seed: int = 0, width: int = len(FEATURES)) -> pa.Table:
    """An id column and `width` random float feature columns."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, width)).astype(np.float64)
    columns = {"id": pa.array(np.arange(rows) + 1000)}
    names = FEATURES if width == len(FEATURES) else [f"f{i}" for i in range(width)]
    for j, name in enumerate(names):
        columns[name] = pa.array(values[:, j])
    return pa.table(columns)


def expected_labels(model: torch.nn.Module, table: pa.Table, names: list[str]) -> list[str]:
    matrix = np.column_stack([table[n].to_numpy() for n in names]).astype(np.float32)
    with torch.inference_mode():
        best = model(torch.from_numpy(matrix)).argmax(dim=1).numpy()
    return [LABELS[i] for i in best]


class Recorder:
    """execute_attempt's `send` that keeps the (job id, attempt) of each message, to deliver
    by hand (a sharded job's shards, then its assembly)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def __call__(self, job: Job, countdown: float = 0.0) -> None:
        self.sent.append((job.id, job.attempt))


def never_resent(job: Job, countdown: float) -> None:
    """execute_attempt's `send` for jobs that end in one attempt: nothing may send them again."""
    raise AssertionError(f"job {job.id} was unexpectedly sent again")
