"""optimize on hf versions (workers/runners/optimize_hf.py): the int8 directory holds int8
Linear weights as safetensors, loads offline on the CPU, and gives what quantizing the float
model at load gives; a head tied to the embeddings stays float."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kiln.errors import JobFailure
from kiln.families import HfParams
from tests.hfkit import bert_directory, gpt2_directory
from workers.ml import hf, quantized
from workers.runners.optimize_hf import PROBES, int8_directory

CPU = torch.device("cpu")


def _written(entries, target: Path) -> Path:
    target.mkdir()
    for entry in entries:
        with entry.open() as source:
            (target / entry.name).write_bytes(source.read())
    return target


def _quantized_at_load(original: hf.HfModel) -> hf.HfModel:
    layers = quantized.untied_linear_layers(original.model)
    model = quantized.quantize_layers(original.model, layers)
    return hf.HfModel(model, original.tokenizer, original.task, original.context)


@pytest.mark.parametrize("task", ["text-classification", "embedding"])
def test_an_int8_bert_scores_as_quantizing_at_load_did(tmp_path: Path, task: str) -> None:
    source = bert_directory(tmp_path / "bert", task)
    original = hf.load(source, task, CPU)
    entries, layers = int8_directory(source, original.model)
    assert layers > 0
    int8_dir = _written(entries, tmp_path / "int8")
    assert sorted(p.name for p in int8_dir.iterdir()) == sorted(
        p.name for p in source.iterdir()
    )  # the same file names: config, tokenizer, model.safetensors
    with safe_open(str(int8_dir / "model.safetensors"), "pt") as stored:
        dtypes = {stored.get_tensor(k).dtype for k in stored.keys() if k.endswith(".weight")}  # noqa: SIM118
    assert torch.int8 in dtypes
    float_size = (source / "model.safetensors").stat().st_size
    assert (int8_dir / "model.safetensors").stat().st_size < float_size

    loaded = hf.load(int8_dir, task, CPU, int8=True)
    params = HfParams(truncation="truncate")
    expected = hf.run(_quantized_at_load(original), PROBES, params)
    assert hf.run(loaded, PROBES, params) == expected
    assert hf.run(original, PROBES, params) != expected  # it is not the float model


def _tiny_llama(directory: Path) -> Path:
    """A causal LM made of Linear layers with its head tied to the embeddings (GPT-2's
    tokenizer; Llama's layers), Linear-dominated: 2.1M Linear weights, 77k embedding ones."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gpt2_directory(directory)
    vocab = len(AutoTokenizer.from_pretrained(directory, local_files_only=True))
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def test_a_tied_language_model_head_stays_float(tmp_path: Path) -> None:
    source = _tiny_llama(tmp_path / "llama")
    original = hf.load(source, "text-generation", CPU)
    entries, layers = int8_directory(source, original.model)
    assert layers == 2 * 7  # q, k, v, o, gate, up, down per layer; not the tied head
    int8_dir = _written(entries, tmp_path / "int8")
    with safe_open(str(int8_dir / "model.safetensors"), "pt") as stored:
        assert "lm_head.weight_scale" not in stored.keys()  # noqa: SIM118
    # Linear-dominated (the embeddings are a few percent): over 3x smaller.
    ratio = (source / "model.safetensors").stat().st_size / (
        int8_dir / "model.safetensors"
    ).stat().st_size
    assert ratio >= 3.0, ratio
    print(f"tiny Llama: float/int8 model.safetensors = {ratio:.2f}")
    loaded = hf.load(int8_dir, "text-generation", CPU, int8=True)
    embeddings = loaded.model.get_input_embeddings().weight
    assert torch.equal(embeddings, original.model.get_input_embeddings().weight)
    params = HfParams(max_new_tokens=5)
    assert hf.run(loaded, ["the quick"], params) == hf.run(
        _quantized_at_load(original), ["the quick"], params
    )


def test_a_model_without_linear_layers_fails_readably(tmp_path: Path) -> None:
    source = gpt2_directory(tmp_path / "gpt2")  # GPT-2's layers are Conv1D, its head tied
    original = hf.load(source, "text-generation", CPU)
    with pytest.raises(JobFailure, match="no Linear layers"):
        int8_directory(source, original.model)
