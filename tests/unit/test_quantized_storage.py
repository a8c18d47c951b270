"""Quantized versions store int8 weights (workers/ml/quantized.py): a quarter of the float
file for a Linear-dominated model, no pickle, and the same outputs as quantizing the float
weights at load; versions stored as floats by an older Kiln still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kiln.errors import JobFailure
from tests import modelkit
from workers.ml import bundle

CPU = torch.device("cpu")


def _float_and_int8(tmp_path: Path) -> tuple[dict, Path, Path, torch.nn.Module]:
    """A seeded MLP (64 -> 256 -> 128 -> 3): its float file, its int8 file, and the model."""
    cfg = {**modelkit.config(width=64, hidden=[256, 128])}
    torch.manual_seed(0)
    original = bundle.build(cfg).eval()
    original.mean.copy_(torch.randn(64))
    original.std.copy_(torch.rand(64) + 0.5)
    float_path = tmp_path / "float.safetensors"
    bundle.save(original, cfg, float_path)
    quantized_cfg = {**cfg, bundle.QUANTIZATION: bundle.DYNAMIC_INT8}
    int8_path = tmp_path / "int8.safetensors"
    int8_path.write_bytes(
        bundle.to_int8_bytes(original, bundle.quantize_dynamic_int8(original), quantized_cfg)
    )
    return cfg, float_path, int8_path, original


def test_the_int8_file_holds_int8_weights_and_is_over_3x_smaller(tmp_path: Path) -> None:
    _, float_path, int8_path, _ = _float_and_int8(tmp_path)
    ratio = float_path.stat().st_size / int8_path.stat().st_size
    assert ratio >= 3.0, ratio
    with safe_open(str(int8_path), "pt") as stored:
        assert stored.get_tensor("net.0.weight").dtype == torch.int8
        assert stored.get_tensor("net.3.weight").dtype == torch.int8
        assert stored.get_tensor("net.0.weight_scale").dtype == torch.float64
        assert stored.get_tensor("net.0.bias").dtype == torch.float32
        assert stored.get_tensor("mean").dtype == torch.float32
        config = json.loads(stored.metadata()["kiln_config"])
    assert config[bundle.QUANTIZED_WEIGHTS] == bundle.INT8


def test_loading_int8_gives_what_quantizing_at_load_gave(tmp_path: Path) -> None:
    cfg, float_path, int8_path, _ = _float_and_int8(tmp_path)
    old_style = {**cfg, bundle.QUANTIZATION: bundle.DYNAMIC_INT8}  # floats, quantized at load
    new_style = {**old_style, bundle.QUANTIZED_WEIGHTS: bundle.INT8}
    at_load, device = bundle.load_for_inference(float_path, old_style, CPU)
    from_int8, _ = bundle.load_for_inference(int8_path, new_style, CPU)
    rows = torch.randn(257, 64, generator=torch.Generator().manual_seed(1)) * 3
    with torch.inference_mode():
        expected, got = at_load(rows), from_int8(rows)
    assert device == CPU
    assert torch.equal(got, expected)
    # ...and it is a quantized model, not the float one.
    float_model, _ = bundle.load_for_inference(float_path, cfg, CPU)
    with torch.inference_mode():
        assert not torch.equal(float_model(rows), got)


def test_int8_weights_that_do_not_fit_the_config_fail_the_job(tmp_path: Path) -> None:
    _, _, int8_path, _ = _float_and_int8(tmp_path)
    other = {
        **modelkit.config(width=64, hidden=[256, 128, 32]),
        bundle.QUANTIZATION: bundle.DYNAMIC_INT8,
        bundle.QUANTIZED_WEIGHTS: bundle.INT8,
    }
    with pytest.raises(JobFailure, match="do not fit"):
        bundle.load_for_inference(int8_path, other, CPU)
