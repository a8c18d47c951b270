"""Fine-tuning hf versions (`train` with arch hf): full and LoRA, through the API and the
runner with a real RunContext, on tests/hfkit.py's tiny BERT (built here, never downloaded)."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hfkit import SENTIMENT, bert_directory
from modelkit import never_resent
from sqlalchemy import select

from db import jobs
from db.models import Job, JobEvent, Metric
from kiln.errors import InvalidSpec, JobFailure
from kiln.families import HfParams
from kiln.specs import HfTrainParams, TrainSpec, parse_spec
from tests.hf_fixtures import database_url, one_thread, runtime  # noqa: F401 (fixtures)
from workers import context
from workers.execute import execute_attempt
from workers.ml import checkpoint as ckpt
from workers.ml import data, finetune, hf
from workers.ml.training import LoopConfig, fit, seed

GOOD, BAD = ["good", "great", "happy"], ["bad", "awful", "sad"]
SUBJECTS = ["day", "night", "city", "river", "model", "queue", "job", "text"]


def reviews(labels: tuple[str, str] = ("neg", "pos")) -> list[tuple[str, str]]:
    """(text, label) rows whose label a word in the text gives away: learnable in a few epochs."""
    rows = []
    for subject, (i, word) in itertools.product(SUBJECTS, enumerate(BAD + GOOD)):
        rows.append((f"the {subject} was {word}", labels[i >= len(BAD)]))
    return rows


def as_csv(rows: list[tuple[str, str]]) -> bytes:
    return ("text,sentiment\n" + "".join(f"{t},{label}\n" for t, label in rows)).encode()


@pytest.fixture(scope="module")
def directories(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        task: bert_directory(root / task, task) for task in ("embedding", "text-classification")
    }


@pytest.fixture
def api(client, alice):
    """api(method, path, **kwargs) -> the response's JSON, checked for a 2xx status."""

    def call(method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = getattr(client, method)(f"/api/v1{path}", headers=alice, **kwargs)
        assert response.status_code == status, response.get_data(as_text=True)
        return response.get_json()

    return call


@pytest.fixture
def register(api, directories):
    def push(task: str, name: str) -> dict:
        files = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(directories[task].iterdir())]
        form = {"family": "hf", "task": task, "files": files}
        return api("post", f"/models/{name}/versions", 201, data=form)

    return push


@pytest.fixture
def upload(api):
    def send(rows: list[tuple[str, str]]) -> str:
        form = {"file": (io.BytesIO(as_csv(rows)), "reviews.csv")}
        return api("post", "/datasets", 201, data=form)["id"]

    return send


@pytest.fixture
def run_job(api, runtime, sessions):
    """run_job(kind, spec) submits through the API, runs one attempt, returns the Job."""

    def run(kind: str, spec: dict, attempt: int = 0, send: Any = never_resent) -> Job:
        job_id = api("post", "/jobs", 202, json={"kind": kind, "spec": spec})["id"]
        return rerun(job_id, attempt, send)

    def rerun(job_id: str, attempt: int, send: Any = never_resent) -> Job:
        execute_attempt(runtime, job_id, attempt, "w1", send)
        with sessions() as session:
            job = session.get(Job, job_id)
            session.expunge(job)
            return job

    run.again = rerun  # type: ignore[attr-defined]
    return run


def _series(sessions, job_id: str) -> dict[str, list[int]]:
    with sessions() as session:
        series: dict[str, list[int]] = {}
        for point in session.scalars(select(Metric).where(Metric.job_id == job_id)):
            series.setdefault(point.name, []).append(point.step)
    return {name: sorted(steps) for name, steps in series.items()}


def _log(sessions, job_id: str) -> list[str]:
    with sessions() as session:
        query = select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return list(session.scalars(query))


def test_the_spec_names_a_base_and_takes_fine_tuning_defaults():
    spec = parse_spec(
        "train",
        {"model_name": "r", "arch": "hf", "arch_params": {"base_model": "m"}, "dataset": "ds1"},
    )
    assert isinstance(spec, TrainSpec)
    assert isinstance(spec.arch_params, HfTrainParams)
    assert (spec.arch_params.base_version, spec.arch_params.method) == ("latest", "lora")
    assert (spec.lr, spec.epochs, spec.batch_size) == (5e-4, 3, 16)  # not the zoo's 3e-3, 20
    full = {"model_name": "r", "arch": "hf", "dataset": "ds1", "lr": 1e-3}
    spec = parse_spec("train", full | {"arch_params": {"base_model": "m", "method": "full"}})
    assert (spec.lr, spec.epochs) == (1e-3, 3)  # what the user sets stays
    # The stored spec, parsed again on the worker, is the same spec.
    assert parse_spec("train", spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset": "builtin:iris"}, "uploaded dataset"),
        ({"task": "regression"}, "classifiers"),
        ({"gpus": 2}, "one process"),
        ({"arch_params": {}}, "base_model"),
        ({"arch_params": {"base_model": "m", "method": "qlora"}}, "method"),
        ({"arch_params": {"base_model": "m", "lora_r": 0}}, "lora_r"),
        ({"arch_params": {"base_model": "m", "base_version": 0}}, "base_version"),
    ],
)
def test_bad_fine_tuning_specs_are_refused_naming_the_field(change, message):
    raw = {"model_name": "r", "arch": "hf", "arch_params": {"base_model": "m"}, "dataset": "d"}
    with pytest.raises(InvalidSpec) as refused:
        parse_spec("train", raw | change)
    assert message in str(refused.value) + str(refused.value.details)


def test_a_full_fine_tune_of_an_embedding_base_predicts_the_datasets_labels(
    register, upload, run_job, api, sessions
):
    register("embedding", "encoder")
    dataset = upload(reviews())
    spec = {
        "model_name": "reviews",
        "arch": "hf",
        "arch_params": {"base_model": "encoder", "method": "full"},
        "dataset": dataset,
        "target": "sentiment",
        "epochs": 12,
        "lr": 2e-3,
        "batch_size": 8,
    }
    job = run_job("train", spec)

    assert job.state == "succeeded", job.error_message
    result = job.result
    assert (result["model"], result["version"], result["task"]) == (
        "reviews",
        1,
        "text-classification",
    )
    assert (result["base"]["model"], result["base"]["version"]) == ("encoder", 1)
    series = _series(sessions, job.id)
    for name in ("train_loss", "val_loss", "val_accuracy"):
        assert series[name] == list(range(1, 13)), name
    assert result["metrics"]["val_accuracy"] >= 0.9  # the word gives the label away
    version = api("get", "/models/reviews/versions/1")
    assert (version["family"], version["task"]) == ("hf", "text-classification")
    assert version["label_names"] == ["neg", "pos"]
    assert version["lineage"]["origin"] == "train"
    assert version["lineage"]["base"]["model"] == "encoder"
    assert version["lineage"]["base"]["version"] == 1
    assert any("a new classification head for 2 labels" in m for m in _log(sessions, job.id))

    texts = ["the city was great", "the river was awful", "the job was happy"]
    predicted = run_job("predict", {"model": "reviews", "inputs": texts})
    assert predicted.state == "succeeded", predicted.error_message
    labels = [p["label"] for p in predicted.result["predictions"]]
    assert labels == ["pos", "neg", "pos"]
    assert set(predicted.result["predictions"][0]["scores"]) == {"neg", "pos"}


def test_a_lora_job_trains_adapters_and_the_base_head_and_registers_a_merged_model(
    register, upload, run_job, api, sessions
):
    register("text-classification", "sentiment")
    dataset = upload(reviews(("negative", "positive")))  # the base's labels: its head is kept
    spec = {
        "model_name": "tuned",
        "arch": "hf",
        "arch_params": {"base_model": "sentiment", "lora_r": 4},
        "dataset": dataset,
        "target": "sentiment",
        "epochs": 2,
    }
    job = run_job("train", spec)

    assert job.state == "succeeded", job.error_message
    log = _log(sessions, job.id)
    assert any(
        "the base's classification head" in m and "LoRA adapters of rank 4" in m for m in log
    )
    version = api("get", "/models/tuned/versions/1")
    assert version["label_names"] == list(SENTIMENT.values())
    assert version["lineage"]["base"] == job.result["base"]
    assert version["lineage"]["spec"]["arch_params"]["method"] == "lora"
    # Stored merged: a plain transformers directory, no adapter files.
    files = set(version["config"]["hf"]["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any("adapter" in name for name in files)
    predicted = run_job("predict", {"model": "tuned", "inputs": ["the day was good"]})
    assert predicted.state == "succeeded", predicted.error_message
    assert predicted.result["predictions"][0]["label"] in SENTIMENT.values()


def test_lora_trains_only_adapter_parameters_and_merging_changes_no_prediction(
    directories, tmp_path
):
    directory = directories["text-classification"]
    tokenizer = finetune.load_tokenizer(directory)
    texts, labels = zip(*reviews(("negative", "positive")), strict=True)
    rows, cut = finetune.encode(tokenizer, list(texts), 64)
    assert cut == 0
    targets = np.array([int(label == "positive") for label in labels], dtype=np.int64)
    table = data.Table(rows, targets, [], ["negative", "positive"])
    params = HfTrainParams(base_model="sentiment", lora_r=4, lora_alpha=8)
    seed(0, torch.device("cpu"))
    model, _ = finetune.load_classifier(directory, "text-classification", table.label_names, params)
    network = finetune.TokenClassifier(model)

    trained = [n for n, p in network.named_parameters() if p.requires_grad]
    assert trained
    assert all("lora_" in n or "modules_to_save" in n for n in trained)
    assert any("classifier" in n for n in trained)  # the head trains beside the adapters
    count, total = finetune.trainable_parameters(network)
    expected = sum(
        p.numel()
        for n, p in network.named_parameters()
        if "lora_" in n or ("modules_to_save" in n and "classifier" in n)
    )
    assert count == expected
    assert count < total / 10

    frozen = {n: p.detach().clone() for n, p in network.named_parameters() if not p.requires_grad}
    loop = LoopConfig(epochs=2, batch_size=16, lr=5e-3, optimizer="adamw", seed=0)
    fit(network, table, table, loop, torch.device("cpu"))
    for name, before in frozen.items():  # the base's weights did not move
        assert torch.equal(dict(network.named_parameters())[name], before), name
    lora_b = [p for n, p in network.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # trained away from their zero start

    probe = ["the city was great", "the river was awful", "the job was sad and bad"]
    encoded, _ = finetune.encode(tokenizer, probe, 64)
    network.eval()
    with torch.no_grad():
        adapted = network(torch.from_numpy(encoded))
    saved = finetune.save_directory(finetune.merged(model), directory, tmp_path / "merged")
    assert not any("adapter" in p.name for p in saved.iterdir())
    finetune.checked_directory(saved, 10**9)  # what the web would accept from a user
    bundle = hf.load(saved, "text-classification", torch.device("cpu"))
    with torch.no_grad():
        merged = bundle.model(**bundle.tokenizer(probe, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    results = hf.run(bundle, probe, HfParams())
    assert [r["label"] for r in results] == [
        SENTIMENT[int(i)] for i in adapted.argmax(dim=1).tolist()
    ]


def test_a_warm_shutdown_mid_epoch_resumes_a_lora_run_at_its_step(
    register, upload, run_job, runtime, sessions, monkeypatch
):
    register("embedding", "encoder")
    dataset = upload(reviews())
    spec = {
        "model_name": "resumed",
        "arch": "hf",
        "arch_params": {"base_model": "encoder"},
        "dataset": dataset,
        "target": "sentiment",
        "epochs": 2,
        "batch_size": 4,
    }
    monkeypatch.setattr(context, "_THROTTLE_S", 0.0)  # progress is reported at every step
    report = context.RunContext.progress

    def progress_then_sigterm(self: context.RunContext, fraction: float, *a: Any, **k: Any) -> None:
        report(self, fraction, *a, **k)
        if 0.2 < fraction < 1.0:  # mid-epoch 1: what workers.shutdown does on SIGTERM
            context.SHUTDOWN.set()

    sent: list[int] = []
    with monkeypatch.context() as patch:
        patch.setattr(context.RunContext, "progress", progress_then_sigterm)
        try:
            job = run_job("train", spec, send=lambda j, _: sent.append(j.attempt))
        finally:
            context.SHUTDOWN.clear()
    assert job.state == "queued"
    assert sent == [job.attempt]
    # A LoRA checkpoint holds what trains (adapters, head), not the frozen base weights.
    saved = ckpt.load(runtime.settings.data_dir / "work" / job.id / ckpt.FILENAME)
    assert saved.tensors["model"]
    assert all("lora_" in k or "modules_to_save" in k for k in saved.tensors["model"])

    done = run_job.again(job.id, job.attempt)
    assert done.state == "succeeded", done.error_message
    resumed = [m for m in _log(sessions, job.id) if m.startswith("resuming from")]
    assert len(resumed) == 1
    epoch, step = (int(word) for word in resumed[0].split()[-3::2])
    assert (epoch, done.result["resumed_from_epoch"]) == (1, 1)
    assert step > 0  # within the epoch, not back at its start
    assert _series(sessions, job.id)["val_accuracy"] == [1, 2]


def test_only_text_classification_and_embedding_versions_are_fine_tuned(
    directories, api, upload, run_job, sessions, tmp_path
):
    from hfkit import gpt2_directory

    generator = gpt2_directory(tmp_path / "gpt2")
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(generator.iterdir())]
    form = {"family": "hf", "task": "text-generation", "files": files}
    api("post", "/models/writer/versions", 201, data=form)
    spec = {"model_name": "x", "arch": "hf", "arch_params": {"base_model": "writer"}}
    spec |= {"dataset": upload(reviews()), "target": "sentiment"}

    # Refused at submit (web.submit_checks), naming the field ...
    refused = api("post", "/jobs", 422, json={"kind": "train", "spec": spec})
    assert refused["errors"][0]["loc"] == ["spec", "arch_params", "base_model"]
    assert "starts from an hf text-classification or embedding version" in refused["detail"]
    # ... and by the runner, for a base that changed between submit and run.
    with sessions() as session:
        queued = jobs.create(session, kind="train", owner="alice", spec=spec, queue="cpu")
        session.commit()
        job_id = queued.id
    job = run_job.again(job_id, 0)
    assert job.state == "failed"
    assert "starts from an hf text-classification or embedding version" in job.error_message


def test_lora_target_modules_the_model_lacks_fail_with_a_reason(directories):
    params = HfTrainParams(base_model="m", lora_target_modules=["no_such_layer"])
    with pytest.raises(JobFailure, match="cannot add LoRA adapters"):
        finetune.load_classifier(directories["embedding"], "embedding", ["a", "b"], params)


@pytest.mark.parametrize(
    ("labels", "kept"),
    [
        (["negative", "positive"], True),  # the base's own labels: its head goes on training
        (["neg", "pos"], False),  # as many labels, other names: a new head
        (["a", "b", "c"], False),  # another number of labels: a new head of that size
    ],
)
def test_a_classifier_base_keeps_its_head_only_for_its_own_labels(directories, labels, kept):
    from transformers import AutoModelForSequenceClassification

    directory = directories["text-classification"]
    base = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True)
    params = HfTrainParams(base_model="m", method="full")
    seed(0, torch.device("cpu"))
    model, built = finetune.load_classifier(directory, "text-classification", labels, params)

    assert model.config.id2label == dict(enumerate(labels))
    assert model.classifier.out_features == len(labels)
    assert ("the base's classification head" in built) is kept
    same = model.classifier.weight.shape == base.classifier.weight.shape and torch.equal(
        model.classifier.weight, base.classifier.weight
    )
    assert same is kept
    # The encoder under the head is the base's either way.
    torch.testing.assert_close(
        model.bert.encoder.layer[0].attention.self.query.weight,
        base.bert.encoder.layer[0].attention.self.query.weight,
    )


def test_early_stopping_restores_the_best_epochs_adapters(register, upload, run_job, sessions):
    register("embedding", "encoder")
    spec = {
        "model_name": "stopped",
        "arch": "hf",
        "arch_params": {"base_model": "encoder"},
        "dataset": upload(reviews()),
        "target": "sentiment",
        "epochs": 6,
        "lr": 1e-9,  # the validation accuracy cannot move: the second epoch is no better
        "early_stopping_patience": 1,
    }
    job = run_job("train", spec)

    assert job.state == "succeeded", job.error_message
    assert (job.result["stopped_early"], job.result["epochs_run"]) == (True, 2)
    assert any(m.startswith("early stopping after epoch 2") for m in _log(sessions, job.id))
    assert _series(sessions, job.id)["val_accuracy"] == [1, 2]


def test_a_cancelled_fine_tune_is_resumed_by_a_new_job_with_resume_from(
    register, upload, run_job, api, sessions, monkeypatch
):
    import dataclasses

    from workers.runners import train

    register("embedding", "encoder")
    spec = {
        "model_name": "again",
        "arch": "hf",
        "arch_params": {"base_model": "encoder"},
        "dataset": upload(reviews()),
        "target": "sentiment",
        "epochs": 3,
    }
    make_hooks = train.job_hooks

    def hooks_that_cancel(spec: Any, ctx: context.RunContext) -> Any:
        hooks = make_hooks(spec, ctx)

        def epoch_then_cancel(number: int, metrics: dict[str, float]) -> None:
            hooks.epoch(number, metrics)
            if number == 1:
                api("post", f"/jobs/{ctx.job_id}/cancel", 202)

        return dataclasses.replace(hooks, epoch=epoch_then_cancel)

    with monkeypatch.context() as patch:
        patch.setattr(context, "_THROTTLE_S", 0.0)
        patch.setattr(train, "job_hooks", hooks_that_cancel)
        first = run_job("train", spec)
    assert first.state == "cancelled"

    second = run_job("train", spec | {"resume_from": first.id})
    assert second.state == "succeeded", second.error_message
    assert second.result["resumed_from_epoch"] == 2
    assert "resuming from checkpoint at epoch 2 step 0" in _log(sessions, second.id)
    assert _series(sessions, second.id)["val_loss"] == [1, 2, 3]
    # A different adapter rank is another model: its checkpoint cannot be resumed.
    other = spec | {"arch_params": {"base_model": "encoder", "lora_r": 2}}
    refused = run_job("train", other | {"resume_from": first.id, "model_name": "other"})
    assert refused.state == "failed"
    assert "trained with another model" in refused.error_message
