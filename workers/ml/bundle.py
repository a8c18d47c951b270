"""A trained model as Kiln stores it: a network that normalises its own input, its weights
as safetensors, and the config that prediction needs (no pickle anywhere).

Config keys: arch, arch_params, feature_names, label_names, task ("classification" or
"regression"), input_shape, target_mean/target_std (regression: the network predicts the
standardised target), target_names (a multi-output regression model: one output per name,
target_mean/target_std then lists), input ("features", or "text" with encoder and
text_column).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn

from kiln.errors import JobFailure
from workers.ml import architectures, quantized


class Network(nn.Module):
    """The zoo network behind a fixed input normalisation (kept as buffers in the weights)."""

    # Registered as buffers below; declared so they read as tensors, not Module attributes.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, width: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.input_shape = input_shape
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.net(x.view(-1, *self.input_shape))


#: The name older code used; bundles and checkpoints hold the same tensors.
Classifier = Network


def task(config: dict[str, Any]) -> str:
    return str(config.get("task", "classification"))


def outputs(config: dict[str, Any]) -> int:
    if task(config) == "regression":
        return max(len(config.get("target_names") or []), 1)
    return len(config["label_names"])


def build(config: dict[str, Any]) -> Network:
    """An untrained Network shaped by `config`."""
    width = len(config["feature_names"])
    shape = tuple(config.get("input_shape") or (width,))
    net = architectures.build(config["arch"], config["arch_params"], shape, outputs(config))
    return Network(net, width, shape)


def to_bytes(model: nn.Module, config: dict[str, Any]) -> bytes:
    """Weights and config as one safetensors file's bytes (a runner hands them straight to
    the artifact store: no scratch file to write and read back)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return safetensors.torch.save(state, metadata={"kiln_config": json.dumps(config)})


def save(model: nn.Module, config: dict[str, Any], path: Path) -> None:
    """Write weights and config into one safetensors file."""
    path.write_bytes(to_bytes(model, config))


def load(path: Path, config: dict[str, Any], device: torch.device) -> Network:
    """Load a Network from safetensors (never pickle) onto `device`, in eval mode."""
    model = build(config)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


#: Config flag of a version made by an optimize job: its Linear layers run in int8.
QUANTIZATION = "quantization"
DYNAMIC_INT8 = "dynamic_int8"
#: Config key of how such a version's file holds them: "int8" (workers/ml/quantized.py).
#: Versions optimized before it existed store floats, quantized again at every load.
QUANTIZED_WEIGHTS = "quantized_weights"
INT8 = "int8"
#: Buffers an uploaded file may leave out; then inputs go into the network unnormalised.
_OPTIONAL = {"mean", "std"}


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` on the CPU with int8 weights in every Linear layer (activations are
    quantized on the fly per batch). Quantization is deterministic: per-tensor min/max of the
    float weights, so the same float weights always give the same int8 weights."""
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao; it still works in torch 2.13
        # and torchao is not a dependency Kiln wants for one function.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(
            model.cpu().eval(), {nn.Linear}, dtype=torch.qint8
        )


def to_int8_bytes(original: nn.Module, quantized_model: nn.Module, config: dict[str, Any]) -> bytes:
    """A dynamically quantized version's file: int8 Linear weights with their scales and
    zero points, the rest as floats (workers/ml/quantized.py); `config` says so."""
    state = quantized.int8_state(original, quantized_model)
    config = {**config, QUANTIZED_WEIGHTS: INT8}
    return safetensors.torch.save(state, metadata={"kiln_config": json.dumps(config)})


def load_for_inference(
    path: Path, config: dict[str, Any], device: torch.device
) -> tuple[nn.Module, torch.device]:
    """Load a registered version ready to score, and the device it runs on.

    A quantized version (config quantization=dynamic_int8) runs on the CPU, where dynamic
    int8 kernels run: its stored int8 weights are set exactly, or, for a version stored as
    floats (optimized by an older Kiln), its Linear layers are quantized again here. Weights
    that do not fit the config (an upload with the wrong layers) fail the job with a reason.
    """
    model = build(config)
    state = load_file(str(path))
    int8 = config.get(QUANTIZED_WEIGHTS) == INT8
    stored, state = (state, quantized.float_view(state)) if int8 else (state, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise JobFailure(f"the weights do not fit the model config: {exc}") from None
    missing = [name for name in missing if name not in _OPTIONAL]
    if missing or unexpected:
        raise JobFailure(
            "the weights do not fit the model config: "
            f"missing tensors {missing[:10]}, unexpected tensors {unexpected[:10]}"
        )
    if config.get(QUANTIZATION) == DYNAMIC_INT8:
        int8_model = quantize_dynamic_int8(model)
        if int8:
            quantized.set_int8_weights(int8_model, stored)
        return int8_model, inference_device(config, device)
    return model.to(device).eval(), device


def inference_device(config: dict[str, Any], device: torch.device) -> torch.device:
    """Where load_for_inference puts this version: quantized kernels run on the CPU only."""
    return torch.device("cpu") if config.get(QUANTIZATION) == DYNAMIC_INT8 else device
