"""A LoRA fine-tune on a real worker survives a SIGKILL: after the reconciler re-queues it,
a second worker resumes at exactly the step of the last checkpoint and registers one hf
version whose lineage names its base. Real Celery workers, Redis and PostgreSQL."""

from __future__ import annotations

import io

import pytest
from hfkit import bert_directory
from sqlalchemy import func, select

from db.models import JobEvent, Metric
from workers.ml import checkpoint as ckpt

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

EPOCHS = 40
WORDS = {"neg": ["bad", "awful", "sad"], "pos": ["good", "great", "happy"]}
SUBJECTS = ["day", "night", "city", "river", "model", "queue", "job", "text"]


def _reviews_csv() -> bytes:
    rows = [
        f"the {subject} was {word} {tail},{label}"
        for label, words in WORDS.items()
        for word in words
        for subject in SUBJECTS
        for tail in ("", "at night", "in paris", "and the job was a job")
    ]
    return ("text,sentiment\n" + "\n".join(rows) + "\n").encode()


def test_a_sigkilled_lora_fine_tune_resumes_at_its_checkpointed_step(
    api, start_worker, reconcile_once, live_settings, sessions, wait_until, tmp_path
):
    directory = bert_directory(tmp_path / "encoder", "embedding")
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(directory.iterdir())]
    response = api.client.post(
        "/api/v1/models/encoder/versions",
        data={"family": "hf", "task": "embedding", "files": files},
        headers=api.headers,
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    dataset = api.upload("reviews.csv", _reviews_csv())["id"]
    spec = {
        "model_name": "reviews",
        "arch": "hf",
        "arch_params": {"base_model": "encoder", "method": "lora", "lora_r": 4},
        "dataset": dataset,
        "target": "sentiment",
        "epochs": EPOCHS,
        "batch_size": 8,
        "checkpoint_every_s": 1,
        "device": "cpu",
    }
    job_id = api.submit("train", spec)["id"]
    first = start_worker()

    def epochs_reported() -> int:
        with sessions() as session:
            query = select(func.count()).where(Metric.job_id == job_id, Metric.name == "val_loss")
            return session.scalar(query)

    wait_until(lambda: epochs_reported() >= 2, "two epochs on the first worker")
    first.kill()
    assert epochs_reported() < EPOCHS, "the kill landed after training ended"
    # Where the next attempt must pick up: the newest whole checkpoint the killed one left.
    saved = ckpt.load(live_settings.data_dir / "work" / job_id / ckpt.FILENAME)
    at = saved.info["position"]
    assert all("lora_" in k or "modules_to_save" in k for k in saved.tensors["model"])

    start_worker()
    wait_until(lambda: reconcile_once().requeued, "the reconciler to re-queue the job", every=0.5)
    done = api.wait_for(job_id, "succeeded", timeout=300)

    assert done["attempt"] == 2
    with sessions() as session:
        log = list(
            session.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            )
        )
        steps = sorted(
            session.scalars(
                select(Metric.step).where(Metric.job_id == job_id, Metric.name == "val_accuracy")
            )
        )
    resumes = [m for m in log if m.startswith("resuming from checkpoint")]
    assert resumes == [f"resuming from checkpoint at epoch {at['epoch']} step {at['step']}"]
    assert done["result"]["resumed_from_epoch"] == at["epoch"]
    assert steps == list(range(1, EPOCHS + 1))  # one series, no gap, no duplicate
    versions = api.get("/models/reviews")["versions"]
    assert [v["number"] for v in versions] == [1]
    assert versions[0]["family"] == "hf"
    assert versions[0]["task"] == "text-classification"
    assert versions[0]["lineage"]["base"]["model"] == "encoder"
    assert versions[0]["lineage"]["base"]["version"] == 1
