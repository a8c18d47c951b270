"""Fine-tuning a Hugging Face classifier: tokenised texts, the model as the training loop
takes it, LoRA adapters, and the finished model saved as a directory the hf loader reads.

The training loop (workers/ml/training.py) trains on a matrix of rows: here a row is a
text's token ids and attention mask, padded to the longest text in the dataset, and
`TokenClassifier` cuts each batch back to its own longest text, so a batch pads no more
than it must. With LoRA only the adapters and the classification head train; saving
merges the adapters into the base weights, so the saved model is a plain transformers
classifier and predict needs nothing new.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from kiln import hfdir
from kiln.errors import JobFailure
from kiln.specs import HfTrainParams
from workers.ml import hf  # sets the hub offline before transformers is imported

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Rows per forward pass when evaluating (the loop's own evaluation batches are sized for
#: small zoo networks, far too many texts for one transformer pass).
EVAL_BATCH = 64
#: Files of a base directory that are the model's own (written anew when saving); the
#: rest (the tokenizer's files) is copied to the new version unchanged.
_MODEL_FILES = {hfdir.CONFIG, hfdir.INDEX, "generation_config.json"}
_OFFLINE: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
#: Where each family of classification heads lives (what peft saves beside the adapters).
_HEADS = ("classifier", "score")


class TokenClassifier(nn.Module):
    """The model as the training loop sees it: rows of [token ids, attention mask] (right
    padded) in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.training or len(rows) <= EVAL_BATCH:
            return self._logits(rows)
        return torch.cat([self._logits(part) for part in rows.split(EVAL_BATCH)])

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        ids, mask = rows[:, 0], rows[:, 1]
        width = int(mask.sum(dim=1).max())  # padding past the batch's longest text: cut
        return self.model(input_ids=ids[:, :width], attention_mask=mask[:, :width]).logits


def load_tokenizer(directory: Path) -> Any:
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **_OFFLINE)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as exc:
        raise JobFailure(f"transformers cannot load the base model's tokenizer: {exc}") from None
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with end-of-text
        if tokenizer.eos_token is None:
            raise JobFailure("the tokenizer has neither a padding nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # TokenClassifier cuts padding off the end
    return tokenizer


def max_length(directory: Path, tokenizer: Any, asked: int | None) -> int:
    """Tokens per text: as asked, within the model's context."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, **_OFFLINE)
    context = hf.context_length(config, tokenizer)
    if asked is not None and asked > context:
        raise JobFailure(f"max_length {asked} is more than the model's context of {context}")
    return asked or context


def encode(tokenizer: Any, texts: list[str], length: int) -> tuple[np.ndarray, int]:
    """Rows of [ids, mask] (shape [texts, 2, longest]) and how many texts were cut. int32:
    the whole set sits on the training device, and no vocabulary needs more."""
    full = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    cut = sum(len(ids) > length for ids in full)
    encoded = tokenizer(
        texts, truncation=True, max_length=length, padding="longest", return_tensors="np"
    )
    rows = np.stack([encoded["input_ids"], encoded["attention_mask"]], axis=1)
    return rows.astype(np.int32), cut


def load_classifier(
    directory: Path, base_task: str, labels: list[str], params: HfTrainParams
) -> tuple[nn.Module, str]:
    """The model to train (seed the generators first: a new head and the adapters are drawn
    from them) and a line saying what was built."""
    import transformers

    id2label = dict(enumerate(labels))
    base_labels = _base_labels(directory) if base_task == "text-classification" else None
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            directory,
            num_labels=len(labels),
            id2label=id2label,
            label2id={label: i for i, label in id2label.items()},
            ignore_mismatched_sizes=True,
            use_safetensors=True,
            **_OFFLINE,
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError) as exc:
        raise JobFailure(f"transformers cannot build a classifier from the base: {exc}") from None
    model.config.problem_type = "single_label_classification"
    if model.config.pad_token_id is None:  # GPT-style heads find each text's last token by it
        model.config.pad_token_id = load_tokenizer(directory).pad_token_id
    if base_labels == labels:
        built = "the base's classification head (the same labels)"
    else:
        if base_labels is not None:  # same count, other labels: the head must start afresh
            _reinitialise(_head(model), getattr(model.config, "initializer_range", 0.02))
        built = f"a new classification head for {len(labels)} labels"
    if params.method == "lora":
        model = _with_lora(model, params)
        built += f", LoRA adapters of rank {params.lora_r}"
    return model, built


def _base_labels(directory: Path) -> list[str] | None:
    config = json.loads((directory / hfdir.CONFIG).read_text())
    id2label = config.get("id2label") or {}
    try:
        return [str(id2label[str(i)]) for i in range(len(id2label))]
    except KeyError:
        return None


def _head(model: nn.Module) -> nn.Module:
    for name in _HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise JobFailure(
        f"cannot find the classification head of {type(model).__name__} "
        f"(looked for {', '.join(_HEADS)})"
    )


def _reinitialise(head: nn.Module, std: float) -> None:
    """Draw the head's weights anew as transformers initialises a missing head: normal
    Linear weights of the config's initializer_range, zero biases. (The model's own
    `_init_weights` skips modules that were loaded from the checkpoint.)"""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif module is not head:
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):  # a LayerNorm in a larger head
                reset()


def _with_lora(model: nn.Module, params: HfTrainParams) -> nn.Module:
    try:
        import peft
    except ImportError:
        raise JobFailure("LoRA needs peft on the worker (pip install 'kiln[text]')") from None
    config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS,  # the head trains too (peft's modules_to_save)
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=params.lora_target_modules,
    )
    try:
        with warnings.catch_warnings():
            # peft reads an attribute transformers 5 deprecated; nothing for a user to act on.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            return peft.get_peft_model(model, config)
    except ValueError as exc:  # target modules unknown for this model type, or not found
        raise JobFailure(f"cannot add LoRA adapters: {exc}") from None


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    counts = [(p.numel(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in counts if trains), sum(n for n, _ in counts)


def merged(model: nn.Module) -> PreTrainedModel:
    """A plain transformers model: LoRA adapters merged into the base weights (in place)."""
    merge = getattr(model, "merge_and_unload", None)
    return cast("PreTrainedModel", merge() if callable(merge) else model)


def save_directory(model: PreTrainedModel, base: Path, target: Path) -> Path:
    """`model` saved as safetensors beside the base's tokenizer files, in `target` (made
    anew: a partial one from a lost attempt goes first)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    model.save_pretrained(target, safe_serialization=True)
    for source in base.iterdir():
        weights = source.suffix == ".safetensors"
        if source.is_file() and not weights and source.name not in _MODEL_FILES:
            shutil.copyfile(source, target / source.name)
    return target


def checked_directory(directory: Path, max_bytes: int) -> hfdir.Checked:
    """The saved directory through the web's own checks: what it would accept from a user,
    and the same tar and summary an upload gets."""
    entries = [
        hfdir.Entry(path.name, path.stat().st_size, _opener(path))
        for path in sorted(directory.iterdir())
        if path.is_file()
    ]
    return hfdir.check(entries, max_bytes)


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")
