"""optimize on an `hf` version: int8 dynamic quantization of its Linear layers, stored as a
new hf version of the same model and task.

The new version's directory is the source's config and tokenizer files with one
`model.safetensors` of int8 Linear weights, their scales and zero points, and every other
tensor float (workers/ml/quantized.py); its config says `quantized_weights: int8`, and
workers load it with workers/ml/hf.py's int8 path, on the CPU. A Linear layer tied to the
embeddings (a language model's head) stays float. There is no labelled data to measure
accuracy on, so the result reports how far the int8 model's outputs move on a few probe
texts, and the two files' sizes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kiln import hfdir
from kiln.errors import JobFailure
from kiln.families import HfParams
from kiln.specs import OptimizeSpec
from workers.context import RunContext
from workers.ml import bundle, hf, quantized

#: Texts both models score, to report how much quantization moved the outputs.
PROBES = [
    "The quick brown fox jumps over the lazy dog.",
    "Kiln trains, versions and serves models.",
    "short",
]


def int8_directory(directory: Path, model: torch.nn.Module) -> tuple[list[hfdir.Entry], int]:
    """The files of the int8 version (the source's config and tokenizer, and one int8
    model.safetensors), and how many layers were quantized."""
    layers = quantized.untied_linear_layers(model)
    if not layers:
        raise JobFailure("this model has no Linear layers to quantize")
    int8_model = quantized.quantize_layers(model, layers)
    weights = safetensors.torch.save(
        quantized.int8_state(model, int8_model), metadata={"format": "pt"}
    )
    kept = [
        path
        for path in sorted(directory.iterdir())
        if not path.name.endswith(".safetensors") and path.name != hfdir.INDEX
    ]
    entries = [hfdir.Entry(p.name, p.stat().st_size, _opener(p)) for p in kept]
    entries.append(hfdir.Entry(hfdir.SINGLE_WEIGHTS, len(weights), lambda: io.BytesIO(weights)))
    return sorted(entries, key=lambda e: e.name), len(layers)


def run(spec: OptimizeSpec, ctx: RunContext) -> dict[str, Any]:
    source = ctx.version(spec.model, spec.version)
    number, config, task = source.number, source.config, source.task or ""
    digest, size, arch, lineage = (
        source.artifact_digest,
        source.artifact_size,
        source.arch,
        source.lineage,
    )
    if config.get(bundle.QUANTIZED_WEIGHTS):
        raise JobFailure(f"version {number} is already quantized")
    if spec.dataset is not None:
        raise JobFailure("optimize measures hf versions on probe texts; leave out dataset")
    ctx.progress(0.1, f"loading version {number}", force=True)
    settings = ctx.runtime.settings
    directory = hf.materialise(ctx.runtime.store, digest, settings.data_dir / "hf-models")
    cpu = torch.device("cpu")
    original = hf.load(directory, task, cpu)
    ctx.progress(0.4, "quantizing its Linear layers", force=True)
    entries, layers = int8_directory(directory, original.model)
    stored = ctx.runtime.store.put_chunks(
        hfdir.tar_chunks(hfdir.Checked(entries=entries, config={})), max_bytes=None
    )
    ctx.progress(0.7, "comparing outputs on probe texts", force=True)
    int8_directory_path = hf.materialise(
        ctx.runtime.store, stored.digest, settings.data_dir / "hf-models"
    )
    int8 = hf.load(int8_directory_path, task, cpu, int8=True)
    drift = _drift(original, int8)
    new_config = {
        **config,
        "hf": {**config.get("hf", {}), "files": {e.name: e.size for e in entries}},
        bundle.QUANTIZATION: bundle.DYNAMIC_INT8,
        bundle.QUANTIZED_WEIGHTS: bundle.INT8,
    }
    new_number = ctx.register_version(
        name=spec.model,
        arch=arch,
        config=new_config,
        metrics={},
        artifact_digest=stored.digest,
        artifact_size=stored.size,
        dataset_digest=None,
        lineage={
            "origin": "optimize",
            "source_version": number,
            "quantization": bundle.DYNAMIC_INT8,
            "files": lineage.get("files", []),
        },
        family="hf",
        task=task,
    )
    return {
        "model": spec.model,
        "version": new_number,
        "source_version": number,
        "quantization": bundle.DYNAMIC_INT8,
        "quantized_layers": layers,
        "size_bytes": {"original": size, "quantized": stored.size},
        "max_abs_output_change": drift,
    }


def _drift(original: hf.HfModel, int8: hf.HfModel) -> float | None:
    """The largest change of an embedding or class probability on the probe texts (none
    for generation, whose output is text)."""
    if original.task not in ("embedding", "text-classification", "token-classification"):
        return None
    params = HfParams(truncation="truncate")
    before = hf.run(original, PROBES, params, lambda done, total: None)
    after = hf.run(int8, PROBES, params, lambda done, total: None)
    return max(_largest_change(a, b) for a, b in zip(before, after, strict=True))


def _largest_change(before: dict[str, Any], after: dict[str, Any]) -> float:
    if "embedding" in before:
        return max(abs(x - y) for x, y in zip(before["embedding"], after["embedding"], strict=True))
    if "scores" in before:
        return max(abs(before["scores"][k] - after["scores"][k]) for k in before["scores"])
    return 0.0


def _opener(path: Path) -> Any:
    return lambda: path.open("rb")
