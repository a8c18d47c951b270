"""Loading registered versions for inference, quantization, and aligning evaluation data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kiln.errors import JobFailure
from workers.ml import bundle
from workers.ml.data import Table
from workers.runners.optimize import _align

CONFIG = {
    "arch": "mlp",
    "arch_params": {"hidden": [16], "dropout": 0.0},
    "feature_names": ["a", "b", "c"],
    "label_names": ["x", "y"],
}
CPU = torch.device("cpu")


@pytest.fixture
def saved(tmp_path):
    """A random Classifier for CONFIG, saved as Kiln saves one; returns (model, path)."""
    torch.manual_seed(0)
    model = bundle.build(CONFIG).eval()
    path = tmp_path / "m.safetensors"
    bundle.save(model, CONFIG, path)
    return model, path


def test_a_version_loads_with_the_weights_it_was_saved_with(saved):
    model, path = saved
    loaded, device = bundle.load_for_inference(path, CONFIG, CPU)
    x = torch.randn(5, 3)
    assert device == CPU
    torch.testing.assert_close(loaded(x), model(x))


def test_a_quantized_version_loads_with_int8_linear_layers_on_the_cpu(saved):
    model, path = saved
    config = {**CONFIG, bundle.QUANTIZATION: bundle.DYNAMIC_INT8}

    loaded, device = bundle.load_for_inference(path, config, CPU)

    assert device == CPU
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert "Linear" in kinds  # the quantized dynamic Linear keeps the name
    assert not any(type(m) is nn.Linear for m in loaded.modules())
    x = torch.randn(64, 3)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), atol=0.05, rtol=0.05)


def test_quantizing_twice_gives_the_same_model(saved):
    model, _ = saved
    x = torch.randn(8, 3)
    first, second = bundle.quantize_dynamic_int8(model), bundle.quantize_dynamic_int8(model)
    with torch.inference_mode():
        assert torch.equal(first(x), second(x))


def test_weights_that_do_not_fit_the_config_fail_the_job_readably(saved, tmp_path):
    _, path = saved
    wider = {**CONFIG, "arch_params": {"hidden": [32], "dropout": 0.0}}
    with pytest.raises(JobFailure, match="do not fit the model config"):
        bundle.load_for_inference(path, wider, CPU)

    renamed = tmp_path / "renamed.safetensors"
    save_file({"0.weight": torch.ones(16, 3)}, str(renamed))
    with pytest.raises(JobFailure, match="missing tensors"):
        bundle.load_for_inference(renamed, CONFIG, CPU)


def test_an_upload_without_normalisation_buffers_feeds_inputs_unchanged(saved, tmp_path):
    model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if k not in {"mean", "std"}}
    path = tmp_path / "plain.safetensors"
    save_file(state, str(path))

    loaded, _ = bundle.load_for_inference(path, CONFIG, CPU)

    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded(x), model.net(x))


def test_evaluation_data_is_reordered_to_the_models_features_and_labels():
    table = Table(
        features=np.array([[3, 1, 2], [6, 4, 5]], dtype=np.float32),
        targets=np.array([0, 1]),
        feature_names=["c", "a", "b"],
        label_names=["y", "x"],
    )

    aligned = _align(table, CONFIG)

    assert aligned.features.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert aligned.targets.tolist() == [1, 0]  # "y" is label 1 of the model, "x" label 0


@pytest.mark.parametrize(
    ("features", "labels", "reason"),
    [(["a", "b"], ["x"], "lacks the model's features"), (["a", "b", "c"], ["z"], "labels")],
)
def test_evaluation_data_the_model_cannot_read_fails_the_job(features, labels, reason):
    table = Table(
        features=np.zeros((1, len(features)), dtype=np.float32),
        targets=np.array([0]),
        feature_names=features,
        label_names=labels,
    )
    with pytest.raises(JobFailure, match=reason):
        _align(table, CONFIG)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_worker_a_quantized_version_still_runs_on_the_cpu(saved):
    _, path = saved
    cuda = torch.device("cuda", 0)
    quantized = {**CONFIG, bundle.QUANTIZATION: bundle.DYNAMIC_INT8}

    _, float_device = bundle.load_for_inference(path, CONFIG, cuda)
    model, int8_device = bundle.load_for_inference(path, quantized, cuda)

    assert float_device == cuda
    assert int8_device == CPU
    with torch.inference_mode():
        assert model(torch.randn(2, 3)).device == CPU
