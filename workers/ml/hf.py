"""Hugging Face model directories on a worker: materialise, load offline, run a task.

Loading never touches the network and never runs code shipped with a model: the hub is
switched off before transformers is imported (HF_HUB_OFFLINE), every from_pretrained call
says local_files_only, trust_remote_code=False and use_safetensors. The web has already
refused pickles and `auto_map` configs (kiln/hfdir.py); these flags are the second lock.

Tasks and the shape of one input's result (every result also says `tokens`, the input's
token count, and `truncated`):

- embedding: {"embedding": [float, ...]}: mean of the last hidden states over the
  attention mask (sentence-transformers' pooling), L2-normalised when asked.
- text-classification: {"label": str, "score": float, "scores": {label: float}} from
  config.id2label (softmax; sigmoid per label for multi-label models).
- token-classification: {"entities": [{"entity", "start", "end", "text", "score"}]}:
  tokens' B-/I- tags grouped into spans of the input's characters, score the mean.
- text-generation: {"text": str, "generated_tokens": int, "finish_reason": "length" |
  "eos" | "stop"}: the continuation only, greedy unless a temperature is given.

Inputs are sorted by token length and padded per batch (to the longest in the batch, never
to the model's maximum); results come back in input order. `forward_sorted` is the one
scoring path of every task: `run`/`results` (predict) and `embeddings` (batch_predict's
vectors as one matrix) are views of it.
"""

from __future__ import annotations

import os

# Before transformers (and huggingface_hub, which reads it at import) is first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from kiln import hfdir
from kiln.artifacts import ArtifactStore
from kiln.errors import JobFailure
from kiln.families import HfParams
from workers.ml import quantized

#: Inputs per forward pass for the encoder tasks, and per generate() call.
ENCODER_BATCH = 32
GENERATION_BATCH = 8
#: Tokenizers without a real limit say 1e30; the model's positions are the bound then.
_NO_LIMIT = 1_000_000


class HfModel(nn.Module):
    """A loaded model with its tokenizer: one entry in the worker's model cache (an
    nn.Module, so the cache counts its parameters' bytes)."""

    def __init__(self, model: nn.Module, tokenizer: Any, task: str, context: int) -> None:
        super().__init__()
        # Any: transformers' models are typed loosely, and nn.Module's __getattr__ would
        # type every attribute read through it as a Tensor or a Module.
        self.model: Any = model
        self.tokenizer = tokenizer
        self.task = task
        #: Tokens an input may have, special tokens included.
        self.context = context


def materialise(store: ArtifactStore, digest: str, cache_root: Path) -> Path:
    """The version's directory under `cache_root`, unpacked from the store once per host."""
    target = cache_root / digest
    if target.is_dir():
        return target
    archive = store.path(digest)
    if not archive.is_file():
        raise JobFailure("the model's files are missing from the artifact store")
    cache_root.mkdir(parents=True, exist_ok=True)
    try:
        hfdir.unpack(archive, target)
    except OSError:
        # Another process of this host unpacked it first (the rename found it there).
        if not target.is_dir():
            raise
    return target


def load(directory: Path, task: str, device: torch.device, int8: bool = False) -> HfModel:
    """Tokenizer and model for `task`, from local files only, on `device`; an `int8`
    version (made by optimize) holds int8 Linear weights and runs on the CPU."""
    import transformers

    classes = {
        "embedding": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "text-generation": transformers.AutoModelForCausalLM,
    }
    if task not in classes:
        raise JobFailure(f"unknown task {task!r}")
    # Offline, and never the directory's own code (written out: transformers types each).
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=False
        )
        if int8:
            config = transformers.AutoConfig.from_pretrained(
                directory, local_files_only=True, trust_remote_code=False
            )
            model = classes[task].from_config(config, trust_remote_code=False)
        else:
            model = classes[task].from_pretrained(
                directory, use_safetensors=True, local_files_only=True, trust_remote_code=False
            )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError) as exc:
        # The directory passed the web's checks, so this is the model's own mismatch (an
        # architecture without a head for the task, a tokenizer needing a missing library).
        raise JobFailure(f"transformers cannot load this model for {task}: {exc}") from None
    model = _load_int8(model, directory) if int8 else model.eval().to(device)
    if tokenizer.pad_token is None:  # GPT-style tokenizers: batches pad with end-of-text
        if tokenizer.eos_token is None:
            raise JobFailure("the tokenizer has neither a padding nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    if task == "text-generation":
        tokenizer.padding_side = "left"  # the continuation follows the prompt directly
    return HfModel(model, tokenizer, task, context_length(model.config, tokenizer))


def _load_int8(model: nn.Module, directory: Path) -> nn.Module:
    """The model with the int8 weights of `model.safetensors` (workers/ml/quantized.py):
    float weights loaded, the same Linear layers quantized, their int8 values set exactly."""
    state = load_file(str(directory / hfdir.SINGLE_WEIGHTS))
    missing, unexpected = model.load_state_dict(quantized.float_view(state), strict=False)
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k not in missing}
    # A key left out because it is tied to a stored one (a head and its embeddings) is fine.
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise JobFailure(
            f"the int8 weights do not fit the model: missing {untied[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    int8_model = quantized.quantize_layers(model, quantized.int8_layers(state))
    quantized.set_int8_weights(int8_model, state)
    return int8_model


def context_length(config: Any, tokenizer: Any) -> int:
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    limits = [n for n in (positions, tokenizer.model_max_length) if n and n < _NO_LIMIT]
    return min(limits) if limits else 512


def run(
    bundle: HfModel,
    texts: list[str],
    params: HfParams,
    after_batch: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """One result per text, in order. JobFailure names the first input that cannot run.
    `after_batch(done, total)` is called after each batch (progress, cancellation)."""
    room = check(bundle, params)
    lengths = token_counts(bundle.tokenizer, texts)
    for i, length in enumerate(lengths):
        if length > room and params.truncation == "error":
            raise JobFailure(too_long(i, length, room))
    return results(bundle, texts, lengths, params, after_batch=after_batch)


def check(bundle: HfModel, params: HfParams) -> int:
    """The tokens an input may have for these parameters (a generation prompt leaves room
    for max_new_tokens); JobFailure for parameters the task does not take."""
    unused = params.unused_for(bundle.task)
    if unused:
        raise JobFailure(f"{', '.join(unused)}: not a parameter of {bundle.task} models")
    room = bundle.context
    if bundle.task == "text-generation":
        room -= params.max_new_tokens
        if room < 1:
            raise JobFailure(
                f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the "
                f"model's context of {bundle.context} tokens"
            )
    return room


def too_long(position: int, length: int, room: int) -> str:
    return (
        f"input {position} is {length} tokens; the model takes {room} "
        "(set truncation to 'truncate' to cut longer inputs)"
    )


def batch_size(task: str) -> int:
    """Inputs per forward pass (per generate() call) unless a job asks for fewer."""
    return GENERATION_BATCH if task == "text-generation" else ENCODER_BATCH


def results(
    bundle: HfModel,
    texts: list[str],
    lengths: list[int],
    params: HfParams,
    size: int | None = None,
    after_batch: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Each text's task result, in input order, scored in batches of similar token length
    (`lengths`: token_counts of `texts`). Each result also says `tokens` (after truncation)
    and `truncated`."""
    room = check(bundle, params)
    found: list[dict[str, Any]] = [{} for _ in texts]
    for order, output in forward_sorted(bundle, texts, lengths, params, size, after_batch):
        records = _records(output)
        for i, record in zip(order, records, strict=True):
            found[i] = record | {"tokens": min(lengths[i], room), "truncated": lengths[i] > room}
    return found


def embeddings(
    bundle: HfModel,
    texts: list[str],
    lengths: list[int],
    params: HfParams,
    size: int | None = None,
    after_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The embedding task's vectors as one float32 matrix on the CPU, a row per text in input
    order: what `results` gives as lists, without a Python float per value."""
    positions: list[int] = []
    parts: list[torch.Tensor] = []
    for order, output in forward_sorted(bundle, texts, lengths, params, size, after_batch):
        positions += order
        parts.append(output)
    if not parts:  # still the model's width: every chunk's column has one type
        config: Any = bundle.model.config
        return torch.empty(0, int(config.hidden_size))
    stacked = torch.cat(parts)
    matrix = torch.empty_like(stacked)
    matrix[torch.tensor(positions)] = stacked
    return matrix


def forward_sorted(
    bundle: HfModel,
    texts: list[str],
    lengths: list[int],
    params: HfParams,
    size: int | None = None,
    after_batch: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[list[int], Any]]:
    """The task's output for each batch with the input positions it holds, batches in
    descending token length: the one scoring path of predict and batch_predict. An
    embedding batch's output is a float32 tensor (a row per input); every other task's
    is a list of result dicts."""
    tasks: dict[str, Callable[[HfModel, list[str], HfParams], Any]] = {
        "embedding": _embed,
        "text-classification": _classify,
        "token-classification": _tag,
        "text-generation": _generate,
    }
    done = 0
    for order in _batches(lengths, size or batch_size(bundle.task)):
        with torch.inference_mode():
            output = tasks[bundle.task](bundle, [texts[i] for i in order], params)
        done += len(order)
        yield order, output
        if after_batch is not None:
            after_batch(done, len(texts))


def _records(output: Any) -> list[dict[str, Any]]:
    if isinstance(output, torch.Tensor):
        return [{"embedding": row} for row in output.tolist()]
    return list(output)


def token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    encoded = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    return [len(ids) for ids in encoded]


def _batches(lengths: list[int], size: int) -> Iterator[list[int]]:
    """Input positions grouped by similar length, so each batch pads little. Longest first:
    every later batch's activations then fit in memory an earlier one freed, where growing
    batches would each need larger blocks and grow the heap (a worker keeps freed memory,
    workers/malloc.py); an input too large for the device also fails at the first pass."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _encode(bundle: HfModel, texts: list[str], max_length: int, **extra: Any) -> Any:
    return bundle.tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        **extra,
    )


def _inputs(bundle: HfModel, encoded: Any) -> dict[str, torch.Tensor]:
    device = next(bundle.model.parameters()).device
    names = bundle.tokenizer.model_input_names
    return {k: v.to(device) for k, v in encoded.items() if k in names}


def _embed(bundle: HfModel, texts: list[str], params: HfParams) -> torch.Tensor:
    inputs = _inputs(bundle, _encode(bundle, texts, bundle.context))
    hidden = bundle.model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if params.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.float().cpu()


def label_names(bundle: HfModel) -> list[str]:
    id2label = bundle.model.config.id2label
    return [str(id2label[i]) for i in range(len(id2label))]


def _classify(bundle: HfModel, texts: list[str], params: HfParams) -> list[dict[str, Any]]:
    inputs = _inputs(bundle, _encode(bundle, texts, bundle.context))
    logits = bundle.model(**inputs).logits.float()
    multi_label = bundle.model.config.problem_type == "multi_label_classification"
    scores = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)
    labels = label_names(bundle)
    results = []
    for row in scores.cpu().tolist():
        best = max(range(len(row)), key=row.__getitem__)
        results.append(
            {
                "label": labels[best],
                "score": row[best],
                "scores": dict(zip(labels, row, strict=True)),
            }
        )
    return results


def _tag(bundle: HfModel, texts: list[str], params: HfParams) -> list[dict[str, Any]]:
    if not bundle.tokenizer.is_fast:
        raise JobFailure("token-classification needs a fast tokenizer (send tokenizer.json)")
    encoded = _encode(
        bundle,
        texts,
        bundle.context,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    logits = bundle.model(**_inputs(bundle, encoded)).logits.float()
    probabilities = torch.softmax(logits, dim=-1).cpu()
    labels = label_names(bundle)
    results = []
    for i, text in enumerate(texts):
        tokens = []
        for j, (start, end) in enumerate(encoded["offset_mapping"][i].tolist()):
            special = encoded["special_tokens_mask"][i][j] or not encoded["attention_mask"][i][j]
            if special or start == end:
                continue
            score, best = probabilities[i, j].max(dim=-1)
            tokens.append((labels[int(best)], start, end, float(score)))
        results.append({"entities": group_entities(text, tokens)})
    return results


def group_entities(text: str, tokens: list[tuple[str, int, int, float]]) -> list[dict[str, Any]]:
    """Tokens' (label, start, end, score) as entity spans: B-X starts an X, I-X continues
    an X (or starts one after anything else), O ends it; a label without a prefix acts
    like I-. The span runs from the first token's start to the last one's end."""
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    scores: list[float] = []

    def close() -> None:
        if current is not None:
            current["score"] = sum(scores) / len(scores)
            current["text"] = text[current["start"] : current["end"]]
            entities.append(current)

    for label, start, end, score in tokens:
        prefix, _, kind = label.partition("-") if label[:2] in ("B-", "I-") else ("I", "", label)
        if label == "O" or (prefix == "B") or current is None or current["entity"] != kind:
            close()
            current, scores = None, []
            if label == "O":
                continue
            current = {"entity": kind, "start": start, "end": end}
        current["end"] = end
        scores.append(score)
    close()
    return entities


def _generate(bundle: HfModel, texts: list[str], params: HfParams) -> list[dict[str, Any]]:
    from transformers import GenerationConfig

    tokenizer, model = bundle.tokenizer, bundle.model
    tokenizer.truncation_side = "left"  # a cut prompt keeps its end, which the text follows
    room = bundle.context - params.max_new_tokens
    inputs = _inputs(bundle, _encode(bundle, texts, room))
    sampling = params.temperature > 0
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=sampling,
        temperature=params.temperature if sampling else None,
        top_p=params.top_p if sampling else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )
    with _seeded(params.seed if sampling else None):
        output = model.generate(**inputs, generation_config=config)
    new = output[:, inputs["input_ids"].shape[1] :].cpu()
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return [_continuation(tokenizer, row.tolist(), eos_ids, params) for row in new]


def _continuation(
    tokenizer: Any, ids: list[int], eos_ids: set[int], params: HfParams
) -> dict[str, Any]:
    """The generated text up to (not including) an end-of-sequence token or stop string."""
    reason = "length"
    for k, token in enumerate(ids):
        if token in eos_ids:
            ids, reason = ids[:k], "eos"
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in params.stop if s in text]
    if cuts:
        text, reason = text[: min(cuts)], "stop"
    return {"text": text, "generated_tokens": len(ids), "finish_reason": reason}


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Sample with `seed` without moving the process's global generator for other jobs."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def to_texts(rows: list[Any]) -> list[str]:
    """Inputs as texts: strings, or {column: text} objects (the `text` key, or the only key)."""
    texts = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            value = row.get("text") if "text" in row or len(row) != 1 else next(iter(row.values()))
            if not isinstance(value, str):
                raise JobFailure(
                    f"input {i} must be a string, or an object with one string (or a 'text' key)"
                )
            row = value
        if not isinstance(row, str):
            raise JobFailure(f"input {i} is not text; this model takes strings")
        texts.append(row)
    return texts
