"""What a job form tells about the user's models: each version's input schema (feature
names), an example row to start from, and the references a version can be picked by.

The same description feeds the server-rendered form (for the model and version it was
opened with) and, as JSON in the page, kiln-form.js (for one picked later).
"""

from __future__ import annotations

import json
from typing import Any

from db.models import Model, ModelVersion

#: Feature names listed in a hint; the rest are counted ("and 54 more").
NAMES_SHOWN = 12
#: Up to this many features an example row names each one; wider rows go in order.
NAMED_ROW_MAX = 16
#: Versions described per model, newest first (older ones are still picked by number).
VERSIONS_DESCRIBED = 20


def describe(models: list[Model]) -> dict[str, Any]:
    """{model name: {"latest": n, "aliases": {alias: n}, "versions": {n: {...}}}}."""
    return {m.name: _model(m) for m in models if m.versions}


def _model(model: Model) -> dict[str, Any]:
    newest = sorted(model.versions, key=lambda v: v.number, reverse=True)
    return {
        "latest": newest[0].number,
        "aliases": dict(sorted(model.aliases.items())),
        "versions": {str(v.number): _version(v) for v in newest[:VERSIONS_DESCRIBED]},
    }


#: An example input per hf task: what a person would send such a model.
_HF_EXAMPLES = {
    "embedding": ["a sentence to embed", "another one"],
    "text-classification": ["a review to classify"],
    "token-classification": ["Ada Lovelace worked in London."],
    "text-generation": ["Once upon a time"],
}


def _version(version: ModelVersion) -> dict[str, Any]:
    config = version.config or {}
    names = version.feature_names
    if version.family == "hf":  # a transformers model: its inputs are plain texts
        task = version.task or ""
        return {
            "arch": version.arch,
            "features": f"texts ({task or 'hf'}): a list of strings",
            "example": json.dumps(_HF_EXAMPLES.get(task, ["a text"])),
        }
    if config.get("input") == "text":
        column = str(config.get("text_column", "text"))
        return {
            "arch": version.arch,
            "features": f"one text column, {column!r}",
            "example": json.dumps([{column: "a sentence to classify"}]),
        }
    shown = ", ".join(names[:NAMES_SHOWN])
    more = len(names) - NAMES_SHOWN
    return {
        "arch": version.arch,
        "features": f"{len(names)} features: {shown}" + (f" and {more} more" if more > 0 else ""),
        "example": example_rows(names),
    }


def example_rows(names: list[str]) -> str:
    """One example row as `inputs` JSON: by name where that stays short, else in order."""
    if len(names) <= NAMED_ROW_MAX:
        return json.dumps([{name: 0 for name in names}])
    return json.dumps([[0] * len(names)])


def resolve(described: dict[str, Any], model: str, ref: str) -> tuple[str, dict[str, Any]] | None:
    """The version a model name and a reference ("latest", an alias, a number) pick, as
    (number, its description); None where the form's values pick none we know."""
    found = described.get(model.strip())
    if found is None:
        return None
    ref = ref.strip() or "latest"
    number = found["latest"] if ref == "latest" else found["aliases"].get(ref, ref)
    version = found["versions"].get(str(number))
    return (str(number), version) if version is not None else None
