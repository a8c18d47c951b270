"""export: write a version as TorchScript into the artifact store and note it on the version.

The web serves exports but never imports torch, so exporting is a job: this runner traces
Kiln's own network (built from the version's config and safetensors weights, never from a
user's TorchScript) and records the file's digest on the version, where
GET /models/<name>/versions/<n>/export finds it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from kiln.specs import ExportSpec
from workers.context import RunContext
from workers.ml import bundle


def run(spec: ExportSpec, ctx: RunContext) -> dict[str, Any]:
    version = ctx.version(spec.model, spec.version)
    version_id, number, config = version.id, version.number, version.config
    digest = version.artifact_digest
    cpu = torch.device("cpu")
    model, _ = bundle.load_for_inference(ctx.runtime.store.path(digest), config, cpu)
    example = torch.randn(
        4, len(config["feature_names"]), generator=torch.Generator().manual_seed(0)
    )
    path = ctx.scratch_dir / "model.torchscript.pt"
    with warnings.catch_warnings(), torch.inference_mode():
        # torch 2.13 marks torch.jit deprecated; TorchScript is still what users load in C++
        # and older runtimes, and tracing our own network is safe.
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        # The export must compute what the registered model computes.
        torch.testing.assert_close(traced(example), model(example))
        torch.jit.save(traced, str(path))
    stored = ctx.runtime.store.move_file(path)
    ctx.record_export(version_id, spec.format, stored.digest, stored.size)
    return {
        "model": spec.model,
        "version": number,
        "format": spec.format,
        "digest": stored.digest,
        "size": stored.size,
    }
