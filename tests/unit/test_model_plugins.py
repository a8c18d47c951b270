"""Model plugins (kiln/plugins.py) with the example plugin installed: its architecture joins
the specs, the forms and the OpenAPI document; the web never imports its builder; unknown
architectures are refused naming the installed plugins; workers without it fail readably."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata

import pytest
import torch
from flask.testing import FlaskClient
from pydantic import BaseModel

from kiln import plugins
from kiln.errors import InvalidSpec, JobFailure
from kiln.specs import ARCH_PARAMS, TrainSpec, _plugin_params, parse_spec
from tests.unit.test_ui import _sign_in
from workers.ml import architectures, bundle

pytestmark = pytest.mark.skipif(
    plugins.get("resnet") is None,
    reason="the example plugin is not installed: pip install -e examples/kiln-plugin-resnet",
)


class _Params(BaseModel):
    width: int = 4


def _plugin(**changes: object) -> plugins.ModelPlugin:
    fields = {"name": "tiny", "params": _Params, "input": "tabular", "builder": "pkg.mod:build"}
    return plugins.ModelPlugin(**{**fields, **changes})  # type: ignore[arg-type]


#: A declaration an entry point can name (the tests below load it by its dotted path).
_GOOD = _plugin()


def test_the_installed_plugin_is_discovered_with_its_distribution() -> None:
    found = plugins.get("resnet")
    assert found is not None
    assert (found.plugin.input, found.distribution) == ("image", "kiln-plugin-resnet")
    assert "resnet" in ARCH_PARAMS


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"name": "mlp"}, "Kiln's own"),
        ({"name": "Bad Name"}, "must be 1-32"),
        ({"builder": "no_colon"}, "dotted path"),
        ({"input": "audio"}, "input must be one of"),
        ({"params": dict}, "pydantic model"),
    ],
)
def test_a_bad_declaration_is_refused(changes: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        plugins.check(_plugin(**changes))
    with pytest.raises(ValueError, match="ModelPlugin"):
        plugins.check({"name": "tiny"})


def test_a_plugin_may_not_define_the_fields_kiln_adds() -> None:
    class WithArch(BaseModel):
        arch: str = "x"

    with pytest.raises(ValueError, match="must not define arch"):
        plugins.check(_plugin(params=WithArch))


def test_the_train_spec_takes_the_plugins_arch_and_params() -> None:
    spec = TrainSpec.model_validate(
        {"model_name": "r", "arch": "resnet", "arch_params": {"width": 4}}
    )
    assert spec.arch_params.model_dump() == {
        "arch": "resnet", "width": 4, "blocks": 2, "dropout": 0.0
    }  # fmt: skip
    with pytest.raises(InvalidSpec) as unknown_field:
        parse_spec("train", {"model_name": "r", "arch": "resnet", "arch_params": {"depth": 3}})
    assert unknown_field.value.details[0]["loc"] == ["spec", "arch_params", "resnet", "depth"]


def test_an_unknown_arch_is_422_at_submit_naming_the_installed_plugins(
    client: FlaskClient, alice: dict[str, str]
) -> None:
    body = {"kind": "train", "spec": {"model_name": "r", "arch": "vit"}}
    response = client.post("/api/v1/jobs", json=body, headers=alice)
    assert response.status_code == 422
    problem = response.get_json()
    assert problem["code"] == "invalid_spec"
    assert "unknown arch 'vit'" in problem["detail"]
    assert "installed plugins: resnet" in problem["detail"]


def test_openapi_and_the_train_form_show_the_plugin(
    client: FlaskClient, create_key: Callable[..., str]
) -> None:
    document = client.get("/api/v1/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    assert "Plugin_resnet" in schemas
    assert set(schemas["Plugin_resnet"]["properties"]) == {"arch", "width", "blocks", "dropout"}
    assert "resnet" in json.dumps(schemas["TrainSpec"]["properties"]["arch"])
    _sign_in(client, create_key("alice"))
    page = client.get("/jobs/new/train").text
    assert '<option value="resnet"' in page
    assert 'name="arch_params.blocks"' in page


def test_the_web_reads_plugins_without_importing_their_builders_or_torch(tmp_path) -> None:
    probe = (
        "import sys, web, kiln.specs; web.create_app(); "
        "assert 'resnet' in kiln.specs.ARCH_PARAMS; "
        "print(','.join(sorted(m for m in sys.modules "
        "if m == 'torch' or m == 'kiln_plugin_resnet.model')))"
    )
    env = {"KILN_DATA_DIR": str(tmp_path), "KILN_REDIS_URL": "memory://", "PATH": ""}
    env["PYTHONPATH"] = ":".join(p for p in sys.path if p)
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == ""


def test_workers_build_the_plugin_and_fail_readably_without_it() -> None:
    net = architectures.build("resnet", {"width": 4, "blocks": 1, "dropout": 0.0}, (1, 8, 8), 10)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="takes image rows"):
        architectures.build("resnet", {"width": 4, "blocks": 1, "dropout": 0.0}, (64,), 10)
    config = {
        "arch": "ghost", "arch_params": {}, "feature_names": ["a", "b"],
        "label_names": ["x", "y"],
    }  # fmt: skip
    with pytest.raises(JobFailure, match="no such model plugin is installed here") as failed:
        bundle.build(config)
    assert "installed plugins: resnet" in str(failed.value)


def test_plugin_weights_upload_as_a_plugin_version(
    client: FlaskClient, alice: dict[str, str]
) -> None:
    config = {
        "arch": "resnet", "arch_params": {"width": 4, "blocks": 1},
        "feature_names": [f"p{i}" for i in range(64)], "label_names": ["a", "b"],
        "input_shape": [1, 8, 8],
    }  # fmt: skip
    torch.manual_seed(0)
    full = {**config, "arch_params": {"width": 4, "blocks": 1, "dropout": 0.0}}
    weights = bundle.to_bytes(bundle.build(full), full)
    data = {"weights": (io.BytesIO(weights), "w.safetensors"), "config": json.dumps(config)}
    response = client.post("/api/v1/models/r/versions", data=data, headers=alice)
    assert response.status_code == 201, response.get_json()
    version = response.get_json()
    assert (version["family"], version["arch"]) == ("plugin", "resnet")
    assert version["config"]["plugin"]["distribution"] == "kiln-plugin-resnet"

    mlp = {"arch": "mlp", "feature_names": ["a"], "label_names": ["x", "y"]}
    data = {"weights": (io.BytesIO(weights), "w.safetensors"), "config": json.dumps(mlp)}
    refused = client.post(
        "/api/v1/models/r/versions", data={**data, "family": "plugin"}, headers=alice
    )
    assert refused.status_code == 400
    assert "zoo architecture, not plugin" in refused.get_json()["detail"]


def test_a_text_plugins_params_gain_the_column_kiln_embeds() -> None:
    found = plugins.Installed(_plugin(input="text"), "kiln-plugin-tiny", "1.0")
    params = _plugin_params(found)
    checked = params.model_validate({"arch": "tiny", "text_column": "body"})
    assert checked.model_dump() == {"arch": "tiny", "width": 4, "text_column": "body"}
    assert "kiln-plugin-tiny 1.0, text input" in (params.__doc__ or "")


def test_broken_or_clashing_entry_points_are_skipped(monkeypatch, caplog) -> None:
    points = [
        metadata.EntryPoint(
            "tiny", "tests.unit.test_model_plugins:_GOOD", plugins.ENTRY_POINT_GROUP
        ),
        metadata.EntryPoint(
            "again", "tests.unit.test_model_plugins:_GOOD", plugins.ENTRY_POINT_GROUP
        ),
        metadata.EntryPoint("gone", "no_such_module:PLUGIN", plugins.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: points)
    found = plugins.installed.__wrapped__()
    assert list(found) == ["tiny"]
    assert "name 'tiny' is taken" in caplog.text
    assert "no_such_module" in caplog.text


def test_the_train_form_submits_a_plugin_job(
    client: FlaskClient, create_key: Callable[..., str], sessions
) -> None:
    from db.models import Job
    from tests.unit.test_ui import _submitted, _token

    _sign_in(client, create_key("alice"))
    form = {
        "csrf_token": _token(client, "/jobs/new/train"),
        "model_name": "r",
        "arch": "resnet",
        "dataset": "builtin:digits_images",
        "arch_params.width": "8",
        "arch_params.blocks": "1",
        "arch_params.hidden": "128, 64",  # the MLP's field, not read for resnet
    }
    job_id = _submitted(client, "/jobs/new/train", form)
    with sessions() as session:
        spec = session.get(Job, job_id).spec
    assert spec["arch_params"] == {"arch": "resnet", "width": 8, "blocks": 1, "dropout": 0.0}
