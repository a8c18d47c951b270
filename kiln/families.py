"""Model families and the Hugging Face tasks' parameters: torch-free, so the web can validate.

A registered version belongs to one family:

- `zoo`: Kiln's own architectures (mlp, cnn, logreg, text), one safetensors file plus a JSON
  config; every version made before families existed is one of these.
- `hf`: a Hugging Face transformers model directory (config, tokenizer, safetensors shards),
  validated by kiln/hfdir.py and loaded offline by workers/ml/hf.py for one `task`.
- `plugin`: an operator-installed architecture (kiln/plugins.py): stored like zoo versions
  (safetensors plus a JSON config), built by the plugin's builder on workers.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Family = Literal["zoo", "hf", "plugin"]
FAMILIES: tuple[str, ...] = get_args(Family)
#: Families a version can be registered in today.
ACCEPTED_FAMILIES = ("zoo", "hf", "plugin")

HfTask = Literal["embedding", "text-classification", "token-classification", "text-generation"]
HF_TASKS: tuple[str, ...] = get_args(HfTask)

#: What to do with an input longer than the model's context: fail that input with a reason,
#: or cut it to the context (its result then says `truncated: true`).
Truncation = Literal["error", "truncate"]

#: Generation parameters: meaningful for `text-generation` only.
_GENERATION = {"max_new_tokens", "temperature", "top_p", "seed", "stop"}
#: Parameters each task accepts (besides `truncation`, which every task takes).
TASK_PARAMS: dict[str, set[str]] = {
    "embedding": {"normalize"},
    "text-classification": set(),
    "token-classification": set(),
    "text-generation": _GENERATION,
}


class HfParams(BaseModel):
    """How a predict job runs an `hf` version. Each field applies to the tasks named in its
    description; setting one another task does not use fails the job with a reason."""

    model_config = ConfigDict(extra="forbid")

    truncation: Truncation = Field(
        default="error",
        description="All tasks: an input longer than the model's context fails ('error') or "
        "is cut to fit ('truncate', and its result says truncated: true).",
    )
    normalize: bool = Field(
        default=False, description="embedding: scale each vector to unit L2 length."
    )
    max_new_tokens: int = Field(
        default=32, ge=1, le=2048, description="text-generation: tokens to generate at most."
    )
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="text-generation: 0 is greedy decoding (the same text every run); above "
        "0 samples with this temperature.",
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="text-generation: nucleus sampling mass."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        lt=2**32,
        description="text-generation: seed of the sampler, so a sampled run can be repeated.",
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=8,
        description="text-generation: the text ends before the first of these strings.",
    )

    def unused_for(self, task: str) -> list[str]:
        """Fields `task` does not use that differ from their defaults (by value: a stored
        spec is written back with every default filled in)."""
        allowed = TASK_PARAMS.get(task, set()) | {"truncation"}
        defaults = HfParams()
        return sorted(
            name
            for name in type(self).model_fields
            if name not in allowed and getattr(self, name) != getattr(defaults, name)
        )
