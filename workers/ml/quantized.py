"""Int8 weights as safetensors: how an optimize job stores a dynamically quantized version.

Each quantized Linear layer `name` is stored as three tensors: `name.weight` (int8),
`name.weight_scale` (float64, one value) and `name.weight_zero_point` (int64, one value),
beside its float `name.bias`; every other tensor (normalisation buffers, convolutions,
batch norms) stays float. About a quarter of the float file for a Linear-dominated model,
and no pickle: torch's own quantized state_dict holds packed parameter objects that only
torch.save can write.

Loading rebuilds the float network from the config, quantizes it, then sets every Linear
layer's int8 weights to the stored ones exactly, so the model computes what quantizing the
float weights at load time computed (the int8 values are the same; activations are
quantized per batch either way).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as dynamic_quantized

from kiln.errors import JobFailure

_SCALE = ".weight_scale"
_ZERO_POINT = ".weight_zero_point"


def int8_state(original: nn.Module, quantized: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to store for `quantized` (the dynamic int8 copy of `original`). A tensor
    tied to an earlier one (a language model's head and its embeddings) is stored once, as
    safetensors requires; loading it into the tied model fills both."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in original.state_dict().items():
        if value.numel() and value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().cpu().contiguous()
    for name, module in quantized.named_modules():
        if not isinstance(module, dynamic_quantized.Linear):
            continue
        weight = module.weight()
        if weight.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ValueError(f"layer {name} is not quantized per tensor ({weight.qscheme()})")
        state[f"{name}.weight"] = weight.int_repr().contiguous()
        state[name + _SCALE] = torch.tensor([weight.q_scale()], dtype=torch.float64)
        state[name + _ZERO_POINT] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
    return state


def int8_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """The Linear layers a stored state holds as int8."""
    return sorted(key.removesuffix(_SCALE) for key in state if key.endswith(_SCALE))


def float_view(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with every int8 weight dequantized and the scales left out: what the float
    network's load_state_dict takes (the exact int8 values are set after quantizing)."""
    floats = {k: v for k, v in state.items() if not k.endswith((_SCALE, _ZERO_POINT))}
    for name in int8_layers(state):
        weight, scale, zero_point = _parts(state, name)
        floats[f"{name}.weight"] = (weight.float() - zero_point) * scale
    return floats


def set_int8_weights(quantized: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each quantized Linear layer of `quantized` the stored int8 weights exactly."""
    stored = set(int8_layers(state))
    layers = {
        name: module
        for name, module in quantized.named_modules()
        if isinstance(module, dynamic_quantized.Linear)
    }
    if stored != set(layers):
        raise JobFailure(
            "the stored int8 weights do not fit the model config: int8 layers "
            f"{sorted(stored)[:10]}, Linear layers {sorted(layers)[:10]}"
        )
    for name, module in layers.items():
        weight, scale, zero_point = _parts(state, name)
        qweight = torch._make_per_tensor_quantized_tensor(weight, scale, zero_point)
        module.set_weight_bias(qweight, module.bias())


def _parts(state: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, float, int]:
    weight = state.get(f"{name}.weight")
    if weight is None or weight.dtype != torch.int8:
        raise JobFailure(f"the stored int8 weights lack layer {name}'s int8 weight")
    scale, zero_point = state[name + _SCALE], state.get(name + _ZERO_POINT)
    if scale.numel() != 1 or zero_point is None or zero_point.numel() != 1:
        raise JobFailure(f"layer {name}'s scale or zero point is not one value")
    return weight, float(scale.item()), int(zero_point.item())


def untied_linear_layers(model: nn.Module) -> list[str]:
    """The Linear layers whose weight no other parameter shares: the ones to quantize (a
    head tied to the embeddings stays float, or the embeddings would change with it)."""
    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[parameter.data_ptr()] = owners.get(parameter.data_ptr(), 0) + 1
    return sorted(
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and owners[module.weight.data_ptr()] == 1
    )


def quantize_layers(model: nn.Module, names: list[str]) -> nn.Module:
    """A CPU copy of `model` with the named Linear layers dynamically quantized to int8."""
    with warnings.catch_warnings():  # torch.ao.quantization's move to torchao; see bundle
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(
            model.cpu().eval(), set(names), dtype=torch.qint8
        )
