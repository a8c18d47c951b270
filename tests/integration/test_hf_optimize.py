"""optimize on an hf version with a real worker: a tiny BERT classifier uploaded through the
API is quantized into an int8 version that predicts on the same worker, close to the float
version, and reports tokens/s."""

from __future__ import annotations

import io

import pytest
from hfkit import bert_directory

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_hf_classifier_is_quantized_into_an_int8_version(api, worker, tmp_path):
    directory = bert_directory(tmp_path / "bert", "text-classification")
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in directory.iterdir()]
    response = api.client.post(
        "/api/v1/models/sent/versions",
        data={"family": "hf", "task": "text-classification", "files": files},
        headers=api.headers,
    )
    assert response.status_code == 201, response.get_data(as_text=True)

    optimized = api.wait_for(api.submit("optimize", {"model": "sent"})["id"], "succeeded")
    result = optimized["result"]
    assert (result["version"], result["source_version"]) == (2, 1)
    assert result["quantized_layers"] > 0
    assert result["size_bytes"]["quantized"] < result["size_bytes"]["original"]
    assert result["max_abs_output_change"] < 0.2
    v2 = api.get("/models/sent/versions/2")
    assert (v2["family"], v2["task"]) == ("hf", "text-classification")
    assert v2["config"]["quantized_weights"] == "int8"

    spec = {"model": "sent", "inputs": ["a good day", "a bad day"]}
    floats = api.wait_for(api.submit("predict", {**spec, "version": 1})["id"], "succeeded")
    int8 = api.wait_for(api.submit("predict", {**spec, "version": 2})["id"], "succeeded")
    assert int8["result"]["tokens_per_s"] > 0
    for before, after in zip(
        floats["result"]["predictions"], int8["result"]["predictions"], strict=True
    ):
        assert set(after["scores"]) == set(before["scores"])
        assert all(abs(after["scores"][k] - before["scores"][k]) < 0.2 for k in before["scores"])
