"""Batch generation: a batch_predict job generating from a tiny GPT-2, against a raw
`model.generate` loop over the same batches.

    KILN_REDIS_URL=redis://127.0.0.1:6379 python bench/generation.py [--rows 2000]

The model is the tiny random GPT-2 the tests build locally (tests/hfkit.py: 2 layers,
hidden size 32, a byte-level BPE tokenizer trained on a few sentences), registered through
POST /api/v1/models/<name>/versions as `kiln models push` does; nothing is downloaded. The
prompts are `--rows` texts of 1 to 40 words in one Parquet file.

Prints (1) the batch_predict job (greedy, `--new-tokens` tokens at most, batches of 8, by a
real worker that stays up across rounds, from submission to the stored output file) beside
(a) a raw loop doing the same work by hand: read the Parquet file, tokenize, sort by token
length, `model.generate` on the same batches of 8 (left padding, greedy), decode the new
tokens, write them to a Parquet file in input order. Tokens are the generated ones up to
each row's end-of-text; both sides count the same total (printed). Best of `--rounds`
interleaved rounds; ratio (1)/(a) of generated tokens/s, target >= 0.90.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from inference_kit import ROOT, Kiln

sys.path.insert(0, str(ROOT / "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"

from hfkit import CORPUS, gpt2_directory

BATCH = 8
MODEL = "tiny-gpt2"


def prompts(rows: int, path: Path, seed: int = 0) -> Path:
    """`rows` prompts of 1 to 40 words drawn from the words the tokenizer was trained on."""
    rng = np.random.default_rng(seed)
    words = np.array(sorted({w for line in CORPUS for w in line.split()}))
    texts = [" ".join(words[rng.integers(0, len(words), n)]) for n in rng.integers(1, 41, rows)]
    pq.write_table(pa.table({"id": pa.array(np.arange(rows)), "text": pa.array(texts)}), path)
    return path


def _job(kiln: Kiln, dataset: str, new_tokens: int) -> tuple[float, int]:
    """Seconds from submission to the stored output, and the tokens it generated."""
    spec = {"model": MODEL, "dataset": dataset, "text_column": "text", "passthrough": ["id"]}
    spec |= {"batch_size": BATCH, "hf": {"max_new_tokens": new_tokens, "truncation": "truncate"}}
    [job] = kiln.insert("batch_predict", [spec])
    seconds = kiln.run([job])
    output = kiln.store.path(kiln.result(job)["output"]["digest"])
    return seconds, int(pc.sum(pq.read_table(output)["generated_tokens"]).as_py())


def _raw_loop(directory: Path, path: Path, new_tokens: int, threads: int) -> tuple[float, int]:
    """Seconds and generated tokens of the job done by hand (the model loaded beforehand)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    eos = model.generation_config.eos_token_id
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos
    )
    room = min(model.config.n_positions, tokenizer.model_max_length) - new_tokens
    started = time.perf_counter()
    table = pq.read_table(path)
    texts = table["text"].to_pylist()
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    generated, total = [""] * len(texts), 0
    for start in range(0, len(order), BATCH):
        batch = order[start : start + BATCH]
        inputs = tokenizer(
            [texts[i] for i in batch],
            padding="longest",
            truncation=True,
            max_length=room,
            return_tensors="pt",
        )
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=config)
        for i, row in zip(batch, output[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
            row = row[: row.index(eos)] if eos in row else row
            total += len(row)
            generated[i] = tokenizer.decode(row, skip_special_tokens=True)
    out = pa.table({"id": table["id"], "generated_text": pa.array(generated)})
    pq.write_table(out, path.with_suffix(".raw.parquet"))
    return time.perf_counter() - started, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000, help="prompts")
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    kiln = Kiln(redis_db=10)
    try:
        directory = gpt2_directory(Path(tempfile.mkdtemp(dir=kiln.folder)) / MODEL)
        kiln.register_hf(MODEL, directory, "text-generation")
        threads = torch.get_num_threads()  # a worker process uses torch's default, as here
        path = prompts(args.rows, kiln.folder / f"prompts-{args.rows}.parquet")
        dataset = kiln.text_dataset(path)
        job: list[tuple[float, int]] = []
        raw: list[tuple[float, int]] = []
        with kiln.worker():
            _job(kiln, kiln.text_dataset(prompts(20, kiln.folder / "warm.parquet", 1)), 2)
            for _ in range(args.rounds):
                raw.append(_raw_loop(directory, path, args.new_tokens, threads))
                job.append(_job(kiln, dataset, args.new_tokens))
        (job_s, job_tokens), (raw_s, raw_tokens) = min(job), min(raw)
        print(f"prompts={args.rows} max_new_tokens={args.new_tokens} batch={BATCH} "
              f"threads={threads}")  # fmt: skip
        rounds = " ".join(f"{j:.2f}/{r:.2f}" for (j, _), (r, _) in zip(job, raw, strict=True))
        print(f"best of {args.rounds} interleaved rounds (job/raw seconds: {rounds})")
        print(f"(1) batch_predict     {job_tokens / job_s:9,.0f} tokens/s ({job_tokens} tokens, "
              f"{job_s:.2f} s submit to output)")  # fmt: skip
        print(f"(a) raw generate loop {raw_tokens / raw_s:9,.0f} tokens/s ({raw_tokens} tokens, "
              f"{raw_s:.2f} s Parquet in, Parquet out)")  # fmt: skip
        if job_tokens != raw_tokens:
            print("  note: the two sides generated different token counts")
        ratio = (job_tokens / job_s) / (raw_tokens / raw_s)
        print(f"ratio (1)/(a): {ratio:.2f} by generated tokens/s (target >= 0.90)")
    finally:
        kiln.close()


if __name__ == "__main__":
    main()
