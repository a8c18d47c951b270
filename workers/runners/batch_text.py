"""batch_predict on `hf` versions: a chunk's texts through the task's one scoring path
(workers/ml/hf.py, shared with predict), as output columns with one row per input row, in
input order, and the reason each other row cannot run.

Within a chunk the texts are scored in batches of similar token length (so a batch pads
little) and written back in input order. A row without a text, or one longer than the
model's context when `truncation` is `error`, gets null outputs and an error-file line
instead of failing the job.

Output columns by task (besides the pass-through ones):

- embedding: `embedding`, a fixed-size list of float32 (the model's hidden size);
- text-classification: `label`, `score` (and `probability_<label>` with `probabilities`);
- token-classification: `entities`, a JSON string of [{entity, start, end, text, score}];
- text-generation: `generated_text`, `generated_tokens`, `finish_reason`;
- every task: `tokens` (the input's tokens after truncation; `prompt_tokens` for
  generation) and `truncated`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kiln.errors import JobFailure
from kiln.families import HfParams
from workers.ml import hf

#: Dataset column types that hold text.
STRING_TYPES = ("string", "large_string")


def text_column(requested: str | None, columns: dict[str, str]) -> str:
    """The column of texts: the one asked for (it must hold strings), or the first string
    column of the dataset."""
    if requested is not None:
        if requested not in columns:
            raise JobFailure(
                f"the dataset has no column {requested!r}; it has {list(columns)[:20]}"
            )
        if columns[requested] not in STRING_TYPES:
            raise JobFailure(
                f"text_column {requested!r} holds {columns[requested]}, not text (strings)"
            )
        return requested
    for name, dtype in columns.items():
        if dtype in STRING_TYPES:
            return name
    raise JobFailure(
        f"the dataset has no string column to score; its columns are {list(columns)[:20]}"
    )


@dataclass
class ScoredChunk:
    columns: dict[str, pa.Array]  # one row per input row; null where the row was not scored
    reasons: dict[int, str]  # row within the chunk -> why it was not scored
    tokens: int  # input tokens scored, after truncation
    generated: int  # tokens generated (text-generation)


class TextScorer:
    """Scores chunks of a dataset with one loaded hf model and the job's parameters."""

    def __init__(
        self,
        model: hf.HfModel,
        params: HfParams,
        column: str,
        batch_size: int,
        probabilities: bool = False,
    ) -> None:
        self.model, self.params, self.column = model, params, column
        self.batch_size, self.probabilities = batch_size, probabilities
        self.room = hf.check(model, params)  # refuses another task's parameters up front

    def score(
        self, batch: pa.RecordBatch, after_batch: Callable[[int, int], None] | None = None
    ) -> ScoredChunk:
        """`after_batch(done, total)` runs after each forward pass (progress, cancel)."""
        values = batch.column(self.column).to_pylist()
        reasons = {i: "the text is missing" for i, v in enumerate(values) if not isinstance(v, str)}
        present = [i for i in range(len(values)) if i not in reasons]
        texts = [values[i] for i in present]
        lengths = hf.token_counts(self.model.tokenizer, texts) if texts else []
        rows: list[int] = []
        kept: list[int] = []
        for i, length in zip(present, lengths, strict=True):
            if length > self.room and self.params.truncation == "error":
                reasons[i] = (
                    f"the text is {length} tokens; the model takes {self.room} "
                    "(set truncation to 'truncate' to cut longer inputs)"
                )
            else:
                rows.append(i)
                kept.append(length)
        texts = [values[i] for i in rows]
        ok = np.zeros(len(values), dtype=bool)
        ok[rows] = True
        tokens = [min(n, self.room) for n in kept]
        columns, generated = self._task_columns(texts, kept, ok, after_batch)
        counted = "prompt_tokens" if self.model.task == "text-generation" else "tokens"
        columns[counted] = _scattered(tokens, ok, pa.int32())
        columns["truncated"] = _scattered([n > self.room for n in kept], ok, pa.bool_())
        return ScoredChunk(columns, reasons, sum(tokens), generated)

    def _task_columns(
        self,
        texts: list[str],
        lengths: list[int],
        ok: np.ndarray,
        after_batch: Callable[[int, int], None] | None,
    ) -> tuple[dict[str, pa.Array], int]:
        model, params, size = self.model, self.params, self.batch_size
        if model.task == "embedding":
            matrix = hf.embeddings(model, texts, lengths, params, size, after_batch).numpy()
            return {"embedding": _vectors(matrix, ok)}, 0
        found = hf.results(model, texts, lengths, params, size, after_batch) if texts else []
        if model.task == "text-classification":
            columns = {
                "label": _scattered([r["label"] for r in found], ok, pa.string()),
                "score": _scattered([r["score"] for r in found], ok, pa.float32()),
            }
            if self.probabilities:
                for label in hf.label_names(model):
                    scores = [r["scores"][label] for r in found]
                    columns[f"probability_{label}"] = _scattered(scores, ok, pa.float32())
            return columns, 0
        if model.task == "token-classification":
            entities = [json.dumps(r["entities"]) for r in found]
            return {"entities": _scattered(entities, ok, pa.string())}, 0
        generated = [r["generated_tokens"] for r in found]
        columns = {
            "generated_text": _scattered([r["text"] for r in found], ok, pa.string()),
            "generated_tokens": _scattered(generated, ok, pa.int32()),
            "finish_reason": _scattered([r["finish_reason"] for r in found], ok, pa.string()),
        }
        return columns, sum(generated)


def _scattered(values: list[Any], ok: np.ndarray, kind: pa.DataType) -> pa.Array:
    """`values` (one per scored row) at the rows where `ok`, null elsewhere."""
    if ok.all():
        return pa.array(values, kind)
    full: list[Any] = [None] * len(ok)
    for row, value in zip(np.flatnonzero(ok), values, strict=True):
        full[row] = value
    return pa.array(full, kind)


def _vectors(matrix: np.ndarray, ok: np.ndarray) -> pa.Array:
    """A fixed-size list column of float32: each scored row's vector, null elsewhere."""
    width = matrix.shape[1]
    full = matrix if ok.all() else np.zeros((len(ok), width), dtype=np.float32)
    if not ok.all():
        full[ok] = matrix
    values = pa.array(np.ascontiguousarray(full, dtype=np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(values, width, mask=pa.array(~ok))
