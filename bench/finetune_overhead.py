"""Seconds per epoch of a Kiln fine-tune job (train, arch hf) beside a plain PyTorch loop
fine-tuning the same tiny BERT on the same texts.

The Kiln side is the real train runner through workers.execute.execute_attempt, with a real
RunContext on a real SQLite database in a temp folder: the base version is unpacked from
the artifact store, the dataset read, texts tokenised, then the shared training loop runs
(metrics, progress, cancellation checks, a checkpoint per epoch), and the merged model is
saved, checked and registered as a new hf version. It runs in this process, so no broker
or worker start-up is counted. The plain side loads the same directory with transformers,
tokenises, splits the rows the same way, and trains with the same optimizer, schedule,
batch size, per-batch padding and a validation pass per epoch, then saves the model.

    PYTHONPATH=. python bench/finetune_overhead.py [--method full|lora] [--epochs 8]
        [--base-epochs 2] [--repeats 3] [--rows 384] [--threads 1]

Prints, per epoch, each side and the ratio (target: at most 1.10): the whole job divided by
its epochs (best of the interleaved repeats, and the median of each repeat's own ratio,
its two sides run back to back), and the marginal cost of an epoch (the slope between the
best --base-epochs and --epochs runs) beside what a job costs once (the intercept).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hfkit import bert_directory

from db import datasets, jobs, migrate, registry
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Job
from kiln import datasets as dataset_files
from kiln import hfdir
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from kiln.specs import TrainSpec, parse_spec
from workers.execute import execute_attempt
from workers.runtime import Runtime

OWNER = "bench"
WORDS = {"neg": ["bad", "awful", "sad"], "pos": ["good", "great", "happy"]}
SUBJECTS = ["day", "night", "city", "river", "model", "queue", "job", "text"]
TAILS = ["", "at night", "in paris", "and the job was a job", "by the river in london"]

Timing = float  # wall seconds per epoch


def reviews(rows: int) -> list[tuple[str, str]]:
    """`rows` labelled texts of mixed length (a word in each gives its label away)."""
    every = [
        (f"the {subject} was {word} {tail}".strip(), label)
        for label, words in WORDS.items()
        for word, subject, tail in itertools.product(words, SUBJECTS, TAILS)
    ]
    return [every[i % len(every)] for i in range(rows)]


def setup(runtime: Runtime, folder: Path, rows: int) -> str:
    """Register the tiny BERT as hf version encoder/1 and upload the texts; the dataset id."""
    directory = bert_directory(folder / "encoder", "embedding")
    entries = [
        hfdir.Entry(p.name, p.stat().st_size, partial(p.open, "rb"))
        for p in sorted(directory.iterdir())
    ]
    checked = hfdir.check(entries, 10**9)
    stored = runtime.store.put_chunks(hfdir.tar_chunks(checked))
    csv = folder / "reviews.csv"
    body = "".join(f"{text},{label}\n" for text, label in reviews(rows))
    csv.write_text("text,sentiment\n" + body)
    table = runtime.store.put_file(csv)
    info = dataset_files.inspect(runtime.store.path(table.digest), "csv")
    with session_scope(runtime.sessions) as session:
        registry.register_version(
            session,
            owner=OWNER,
            name="encoder",
            source_job_id=None,
            arch="bert",
            config={"hf": checked.summary, "label_names": []},
            metrics={},
            artifact_digest=stored.digest,
            artifact_size=stored.size,
            dataset_digest=None,
            family="hf",
            task="embedding",
        )
        found = datasets.create(
            session, owner=OWNER, name="reviews.csv", info=info, size_bytes=table.size,
            digest=table.digest,
        )  # fmt: skip
        return found.id


def spec(dataset: str, method: str, epochs: int) -> dict:
    return {
        "model_name": "tuned",
        "arch": "hf",
        "arch_params": {"base_model": "encoder", "method": method, "lora_r": 8},
        "dataset": dataset,
        "target": "sentiment",
        "epochs": epochs,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr_schedule": "cosine",
        "device": "cpu",
    }


def _no_resend(job: Job, countdown: float) -> None:
    raise SystemExit(f"the Kiln job {job.id} was re-queued; the measurement is void")


def kiln_epoch_s(runtime: Runtime, dataset: str, method: str, epochs: int) -> Timing:
    """Run one fine-tune job to completion; seconds per epoch of the whole job."""
    with session_scope(runtime.sessions) as session:
        job = jobs.create(
            session, kind="train", owner=OWNER, spec=spec(dataset, method, epochs), queue="cpu"
        )
        session.flush()
        job_id = job.id
    started = time.perf_counter()
    execute_attempt(runtime, job_id, 0, worker="bench", send=_no_resend)
    elapsed = time.perf_counter() - started
    with session_scope(runtime.sessions) as session:
        done = session.get(Job, job_id)
        assert done is not None
        if done.state != "succeeded":
            raise SystemExit(f"the Kiln job ended {done.state}: {done.error_message}")
    return elapsed / epochs


def plain_epoch_s(
    directory: Path,
    texts: list[str],
    labels: list[str],
    method: str,
    lr: float,
    epochs: int,
    out: Path,
) -> Timing:
    """The same fine-tune as a plain loop; seconds per epoch, loading and saving included."""
    import transformers

    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    names = sorted(set(labels))
    targets = np.array([names.index(label) for label in labels], dtype=np.int64)
    encoded = tokenizer(texts, padding="longest", truncation=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    # The same split as Kiln's (data.split is a seeded permutation of the row numbers).
    order = np.random.default_rng(0).permutation(len(targets))
    n_val = max(1, round(len(order) * 0.2))
    val_rows, train_rows = torch.from_numpy(order[:n_val]), torch.from_numpy(order[n_val:])
    y = torch.from_numpy(targets)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=len(names), local_files_only=True, use_safetensors=True
    )
    if method == "lora":
        import peft

        config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16)
        model = peft.get_peft_model(model, config)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)  # Kiln's default decay
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(0)
    size = 16

    def logits(rows: torch.Tensor) -> torch.Tensor:
        width = int(mask[rows].sum(dim=1).max())
        return model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width]).logits

    for _ in range(epochs):
        model.train()
        shuffled = train_rows[torch.randperm(len(train_rows), generator=generator)]
        for start in range(0, len(shuffled), size):
            rows = shuffled[start : start + size]
            loss = nn.functional.cross_entropy(logits(rows), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
        schedule.step()
        model.eval()
        with torch.no_grad():
            scores = torch.cat([logits(part) for part in val_rows.split(64)])
            nn.functional.cross_entropy(scores, y[val_rows]).item()
            (scores.argmax(1) == y[val_rows]).float().mean().item()
    if method == "lora":
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    return (time.perf_counter() - started) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["full", "lora"], default="lora")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--base-epochs", type=int, default=2, help="the short run of the slope")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The plain side uses the learning rate Kiln's spec gives the method by default.
    parsed = parse_spec("train", spec("d", args.method, 1))
    assert isinstance(parsed, TrainSpec)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "data").mkdir()
        settings = Settings(data_dir=folder / "data", redis_url="memory://")
        migrate.upgrade(settings.resolved_database_url)
        engine = make_engine(settings.resolved_database_url)
        runtime = Runtime(
            settings, make_sessionmaker(engine), ArtifactStore(settings.artifacts_dir)
        )
        dataset = setup(runtime, folder, args.rows)
        texts, labels = (list(c) for c in zip(*reviews(args.rows), strict=True))
        plain = partial(plain_epoch_s, folder / "encoder", texts, labels, args.method, parsed.lr)
        kiln = partial(kiln_epoch_s, runtime, dataset, args.method)
        # Warm-up: first-use imports (transformers' model classes, peft, the optimizer's
        # torch._dynamo) are per process, not per epoch.
        plain(1, folder / "plain-out")
        kiln(1)
        gc.freeze()  # as a worker's pool process does at start (workers.main)
        lengths = (args.base_epochs, args.epochs)
        runs: dict[tuple[str, int], list[Timing]] = {
            (side, n): [] for side in ("plain", "kiln") for n in lengths
        }
        sides = [("plain", lambda n: plain(n, folder / "plain-out")), ("kiln", kiln)]
        for repeat in range(args.repeats):
            for n in lengths:
                # Interleaved, and which side goes first alternates.
                for side, run in sides[:: 1 if repeat % 2 == 0 else -1]:
                    runs[side, n].append(run(n))
        engine.dispose()
    _report(args, runs, lengths)


def _report(
    args: argparse.Namespace, runs: dict[tuple[str, int], list[Timing]], lengths: tuple[int, int]
) -> None:
    plain, kiln = runs["plain", args.epochs], runs["kiln", args.epochs]
    print(
        f"method={args.method} rows={args.rows} threads={args.threads} epochs={args.epochs} "
        f"repeats={args.repeats} (tiny BERT: 2 layers, hidden 32)"
    )
    p, k = min(plain), min(kiln)
    print(
        f"{'best wall':>12}: plain {p * 1000:7.1f} ms/epoch  Kiln {k * 1000:7.1f} ms/epoch  "
        f"ratio {k / p:.3f}"
    )
    paired = sorted(b / a for a, b in zip(plain, kiln, strict=True))
    print(
        f"{'paired':>12}: median of the {len(paired)} repeats' ratios "
        f"{statistics.median(paired):.3f}  (lowest {paired[0]:.3f}, highest {paired[-1]:.3f})"
    )
    slope, intercept = {}, {}
    for side in ("plain", "kiln"):
        short, full = (min(runs[side, n]) * n for n in lengths)
        slope[side] = (full - short) / (args.epochs - args.base_epochs)
        intercept[side] = full - slope[side] * args.epochs
    print(
        f"{'marginal':>12}: plain {slope['plain'] * 1000:7.1f} ms/epoch  Kiln "
        f"{slope['kiln'] * 1000:7.1f} ms/epoch  ratio {slope['kiln'] / slope['plain']:.3f}  "
        f"(best {args.base_epochs}- and {args.epochs}-epoch runs)"
    )
    print(
        f"{'once a job':>12}: plain {intercept['plain'] * 1000:7.1f} ms  "
        f"Kiln {intercept['kiln'] * 1000:7.1f} ms"
    )
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    main()
