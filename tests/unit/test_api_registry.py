"""The registry API: uploads, downloads, aliases, deletes of versions and datasets."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from db import registry
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings

CONFIG = {
    "arch": "mlp",
    "arch_params": {"hidden": [4], "dropout": 0.0},
    "feature_names": ["a", "b", "c"],
    "label_names": ["no", "yes"],
}


def mlp_weights(seed: int = 0) -> bytes:
    """A state dict shaped like Kiln's Classifier for CONFIG (3 features, 4 hidden, 2 labels)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "net.0.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "net.0.bias": np.zeros(4, np.float32),
        "net.3.weight": rng.standard_normal((2, 4)).astype(np.float32),
        "net.3.bias": np.zeros(2, np.float32),
        "mean": np.zeros(3, np.float32),
        "std": np.ones(3, np.float32),
    }
    return save(tensors)


def upload(
    client, headers, content: bytes, config=CONFIG, name: str = "ext", filename="m.safetensors"
):
    form = {"weights": (io.BytesIO(content), filename)}
    if config is not None:
        form["config"] = json.dumps(config)
    return client.post(f"/api/v1/models/{name}/versions", data=form, headers=headers)


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["code"] == code
    return body


def stored_files(settings) -> list[Path]:
    root = settings.artifacts_dir
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def download(client, url: str, headers):
    """GET a file route; the response is closed, as a WSGI server closes the file it sent."""
    response = client.get(url, headers=headers)
    response.get_data()
    response.close()
    return response


@pytest.fixture
def register(sessions, settings):
    """register(name, content=..., dataset_digest=None) -> version number, its file stored."""

    def register_one(name: str, content: bytes = b"weights", dataset_digest=None, owner="alice"):
        stored = ArtifactStore(settings.artifacts_dir).put_bytes(content)
        with sessions() as session:
            version = registry.register_version(
                session,
                owner=owner,
                name=name,
                source_job_id=None,
                arch="mlp",
                config=CONFIG,
                metrics={},
                artifact_digest=stored.digest,
                artifact_size=stored.size,
                dataset_digest=dataset_digest,
            )
            session.commit()
            return version.number

    return register_one


def test_a_session_holding_the_model_sees_each_version_number_it_gives_out(sessions):
    fields = {"owner": "alice", "name": "m", "source_job_id": None, "arch": "mlp",
              "config": CONFIG, "metrics": {}, "artifact_digest": "0" * 64,
              "artifact_size": 1, "dataset_digest": None}  # fmt: skip
    with sessions() as session:
        first = registry.register_version(session, **fields)
        model = registry.get_model(session, "alice", "m")
        second = registry.register_version(session, **fields)
        assert (first.number, second.number, model.last_number) == (1, 2, 2)


# --- upload -----------------------------------------------------------------------------------


def test_an_uploaded_safetensors_model_becomes_a_version_with_its_schema(client, alice, settings):
    content = mlp_weights()

    response = upload(client, alice, content)

    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == "/api/v1/models/ext/versions/1"
    assert body["number"] == 1
    assert body["feature_names"] == ["a", "b", "c"]
    assert body["label_names"] == ["no", "yes"]
    assert body["lineage"] == {"origin": "upload", "filename": "m.safetensors"}
    assert body["artifact_digest"] == hashlib.sha256(content).hexdigest()
    assert body["artifact_size"] == len(content)
    stored = ArtifactStore(settings.artifacts_dir).path(body["artifact_digest"])
    assert stored.read_bytes() == content


def test_an_upload_fills_in_the_arch_defaults(client, alice):
    config = {**CONFIG, "arch_params": {"hidden": [4]}}
    body = upload(client, alice, mlp_weights(), config).get_json()
    assert body["config"]["arch_params"] == {"hidden": [4], "dropout": 0.1}


def test_a_second_upload_is_the_next_version(client, alice):
    upload(client, alice, mlp_weights(0))
    assert upload(client, alice, mlp_weights(1)).get_json()["number"] == 2


def test_a_pickle_renamed_safetensors_is_refused_and_not_stored(client, alice, settings):
    disguised = pickle.dumps({"net.0.weight": [[1.0, 2.0, 3.0]]})

    response = upload(client, alice, disguised, filename="model.safetensors")

    body = assert_problem(response, 415, "unsafe_model_file")
    assert "pickle" in body["detail"]
    assert stored_files(settings) == []
    assert client.get("/api/v1/models/ext", headers=alice).status_code == 404


def test_a_torch_save_file_is_refused_as_a_zip(client, alice, settings):
    import torch

    buffer = io.BytesIO()
    torch.save({"net.0.weight": torch.ones(4, 3)}, buffer)

    response = upload(client, alice, buffer.getvalue())

    assert "zip archive" in assert_problem(response, 415, "unsafe_model_file")["detail"]
    assert stored_files(settings) == []


def test_a_truncated_file_is_refused_and_not_stored(client, alice, settings):
    response = upload(client, alice, mlp_weights()[:-3])

    assert_problem(response, 422, "invalid_model_file")
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    ("config", "loc"),
    [
        ({**CONFIG, "arch": "transformer"}, ["config"]),
        ({**CONFIG, "arch_params": {"hidden": [0]}}, ["config"]),
        ({**CONFIG, "label_names": ["only"]}, ["config", "label_names"]),
        ({**CONFIG, "feature_names": ["a", "a", "c"]}, ["config", "feature_names"]),
        ({**CONFIG, "extra": 1}, ["config", "extra"]),
    ],
    ids=["unknown-arch", "bad-params", "one-label", "duplicate-features", "unknown-field"],
)
def test_a_bad_config_is_refused_naming_the_field(client, alice, config, loc):
    body = assert_problem(upload(client, alice, mlp_weights(), config), 400, "invalid_request")
    assert body["errors"][0]["loc"][: len(loc)] == loc


def test_a_missing_config_or_weights_part_is_refused(client, alice):
    assert_problem(upload(client, alice, mlp_weights(), config=None), 400, "invalid_request")
    response = client.post(
        "/api/v1/models/ext/versions", data={"config": json.dumps(CONFIG)}, headers=alice
    )
    assert_problem(response, 400, "invalid_request")


def test_weights_whose_normalisation_does_not_match_the_features_are_refused(client, alice):
    config = {**CONFIG, "feature_names": ["a", "b"]}
    body = assert_problem(upload(client, alice, mlp_weights(), config), 422, "invalid_model_file")
    assert "mean" in body["detail"]


def test_weights_larger_than_the_upload_limit_are_refused_and_not_stored(make_app, alice, settings):
    content = mlp_weights()
    client = make_app(max_upload_bytes=len(content) - 1).test_client()

    assert_problem(upload(client, alice, content), 413, "payload_too_large")
    assert stored_files(settings) == []


def test_a_bad_model_name_is_refused(client, alice):
    assert_problem(upload(client, alice, mlp_weights(), name=".hidden"), 400, "invalid_request")


# --- downloads --------------------------------------------------------------------------------


def test_the_weights_download_is_the_safetensors_file(client, alice):
    content = mlp_weights()
    upload(client, alice, content)

    response = download(client, "/api/v1/models/ext/versions/1/weights", alice)

    assert response.status_code == 200
    assert response.data == content
    assert "ext-v1.safetensors" in response.headers["Content-Disposition"]
    assert set(load(response.data)) == {
        "net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias", "mean", "std"
    }  # fmt: skip


def test_another_users_weights_are_not_found(client, alice, bob):
    upload(client, alice, mlp_weights())
    response = download(client, "/api/v1/models/ext/versions/1/weights", bob)
    assert_problem(response, 404, "not_found")


def test_an_export_not_made_yet_answers_404_telling_how_to_make_one(client, alice):
    upload(client, alice, mlp_weights())

    response = client.get("/api/v1/models/ext/versions/1/export?format=torchscript", headers=alice)

    assert '"kind": "export"' in assert_problem(response, 404, "export_missing")["detail"]


def test_a_recorded_export_is_downloaded(client, alice, sessions, settings):
    version_number = upload(client, alice, mlp_weights()).get_json()["number"]
    stored = ArtifactStore(settings.artifacts_dir).put_bytes(b"PK\x03\x04 torchscript")
    with sessions() as session:
        model = registry.get_model(session, "alice", "ext")
        version = registry.resolve_version(session, model, version_number)
        registry.record_export(session, version.id, "torchscript", stored.digest, stored.size)
        session.commit()

    response = download(client, "/api/v1/models/ext/versions/1/export", alice)
    described = client.get("/api/v1/models/ext/versions/1", headers=alice).get_json()

    assert response.status_code == 200
    assert response.data == b"PK\x03\x04 torchscript"
    assert described["exports"] == {"torchscript": {"digest": stored.digest, "size": stored.size}}


def test_an_unknown_export_format_is_refused(client, alice):
    upload(client, alice, mlp_weights())
    response = client.get("/api/v1/models/ext/versions/1/export?format=onnx", headers=alice)
    assert_problem(response, 400, "invalid_request")


# --- aliases ----------------------------------------------------------------------------------


def put_alias(client, headers, alias: str, version, name: str = "m"):
    return client.put(
        f"/api/v1/models/{name}/aliases/{alias}", json={"version": version}, headers=headers
    )


def test_an_alias_is_set_moved_and_deleted(client, alice, register):
    register("m")
    register("m")

    set_ = put_alias(client, alice, "production", 1)
    moved = put_alias(client, alice, "production", 2)
    staging = put_alias(client, alice, "staging", 1)
    resolved = client.get("/api/v1/models/m/versions/production", headers=alice)
    deleted = client.delete("/api/v1/models/m/aliases/staging", headers=alice)

    assert set_.status_code == 200
    assert set_.get_json()["aliases"] == {"production": 1}
    assert moved.get_json()["aliases"] == {"production": 2}
    assert staging.get_json()["aliases"] == {"production": 2, "staging": 1}
    assert resolved.get_json()["number"] == 2
    assert deleted.get_json()["aliases"] == {"production": 2}


def test_an_alias_to_a_missing_version_is_refused(client, alice, register):
    register("m")
    assert_problem(put_alias(client, alice, "production", 5), 404, "not_found")
    assert client.get("/api/v1/models/m", headers=alice).get_json()["aliases"] == {}


@pytest.mark.parametrize("alias", ["123", "latest", "-x", "a" * 64])
def test_an_alias_that_could_be_mistaken_is_refused(client, alice, register, alias):
    register("m")
    assert_problem(put_alias(client, alice, alias, 1), 400, "invalid_request")


@pytest.mark.parametrize("body", [{"version": 0}, {"version": "two"}, {}, {"version": 1, "x": 1}])
def test_a_bad_alias_body_is_refused(client, alice, register, body):
    register("m")
    response = client.put("/api/v1/models/m/aliases/prod", json=body, headers=alice)
    assert_problem(response, 422, "invalid_body")


def test_deleting_an_unknown_alias_answers_404(client, alice, register):
    register("m")
    assert_problem(client.delete("/api/v1/models/m/aliases/prod", headers=alice), 404, "not_found")


def test_another_users_model_cannot_be_aliased(client, alice, bob, register):
    register("m")
    assert_problem(put_alias(client, bob, "production", 1), 404, "not_found")


# --- deleting versions ------------------------------------------------------------------------


def test_an_aliased_version_cannot_be_deleted_until_the_alias_moves(client, alice, register):
    register("m")
    register("m")
    put_alias(client, alice, "production", 1)

    refused = client.delete("/api/v1/models/m/versions/1", headers=alice)
    put_alias(client, alice, "production", 2)
    accepted = client.delete("/api/v1/models/m/versions/1", headers=alice)

    assert "production" in assert_problem(refused, 409, "in_use")["detail"]
    assert accepted.status_code == 204
    versions = client.get("/api/v1/models/m", headers=alice).get_json()["versions"]
    assert [v["number"] for v in versions] == [2]


def test_deleting_a_version_removes_its_file_unless_another_version_shares_it(
    client, alice, register, settings
):
    register("m", b"shared")
    register("m", b"shared")
    register("m", b"own")
    store = ArtifactStore(settings.artifacts_dir)
    shared, own = (store.path(hashlib.sha256(c).hexdigest()) for c in (b"shared", b"own"))

    assert client.delete("/api/v1/models/m/versions/1", headers=alice).status_code == 204
    assert client.delete("/api/v1/models/m/versions/3", headers=alice).status_code == 204

    assert shared.exists()
    assert not own.exists()


def test_version_numbers_are_not_reused_after_a_delete(client, alice, register):
    register("m")
    register("m")
    client.delete("/api/v1/models/m/versions/2", headers=alice)

    assert register("m") == 3
    assert_problem(client.get("/api/v1/models/m/versions/2", headers=alice), 404, "not_found")


def test_deleting_a_missing_version_answers_404(client, alice, bob, register):
    register("m")
    assert_problem(client.delete("/api/v1/models/m/versions/9", headers=alice), 404, "not_found")
    assert_problem(client.delete("/api/v1/models/m/versions/1", headers=bob), 404, "not_found")


# --- deleting datasets ------------------------------------------------------------------------


def upload_dataset(client, headers, content: bytes = b"a,label\n1,x\n2,y\n") -> dict:
    response = client.post(
        "/api/v1/datasets", data={"file": (io.BytesIO(content), "d.csv")}, headers=headers
    )
    assert response.status_code == 201
    return response.get_json()


def test_a_dataset_a_version_was_trained_on_cannot_be_deleted(client, alice, register, settings):
    dataset = upload_dataset(client, alice)
    register("m", dataset_digest=dataset["digest"])

    response = client.delete(f"/api/v1/datasets/{dataset['id']}", headers=alice)

    assert "m v1" in assert_problem(response, 409, "in_use")["detail"]
    assert client.get(f"/api/v1/datasets/{dataset['id']}", headers=alice).status_code == 200
    assert ArtifactStore(settings.artifacts_dir).path(dataset["digest"]).exists()


def test_an_unused_dataset_is_deleted_with_its_file(client, alice, settings):
    dataset = upload_dataset(client, alice)

    response = client.delete(f"/api/v1/datasets/{dataset['id']}", headers=alice)

    assert response.status_code == 204
    assert_problem(client.get(f"/api/v1/datasets/{dataset['id']}", headers=alice), 404, "not_found")
    assert not ArtifactStore(settings.artifacts_dir).path(dataset["digest"]).exists()


def test_a_dataset_file_shared_with_another_upload_is_kept(client, alice, bob, settings):
    mine = upload_dataset(client, alice)
    theirs = upload_dataset(client, bob)

    assert client.delete(f"/api/v1/datasets/{mine['id']}", headers=alice).status_code == 204

    assert ArtifactStore(settings.artifacts_dir).path(theirs["digest"]).exists()
    assert client.get(f"/api/v1/datasets/{theirs['id']}", headers=bob).status_code == 200


def test_the_version_is_deleted_then_the_dataset_can_be(client, alice, register):
    dataset = upload_dataset(client, alice)
    register("m", dataset_digest=dataset["digest"])

    client.delete("/api/v1/models/m/versions/1", headers=alice)
    response = client.delete(f"/api/v1/datasets/{dataset['id']}", headers=alice)

    assert response.status_code == 204


def test_another_users_dataset_cannot_be_deleted(client, alice, bob):
    dataset = upload_dataset(client, alice)
    response = client.delete(f"/api/v1/datasets/{dataset['id']}", headers=bob)
    assert_problem(response, 404, "not_found")


def test_weights_are_downloaded_from_the_default_relative_data_dir(
    make_app, create_key, auth, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    data_dir = Settings(data_dir=Path("var")).data_dir  # KILN_DATA_DIR's default is relative
    assert data_dir == tmp_path.resolve() / "var"
    client = make_app(data_dir=data_dir).test_client()
    alice = auth(create_key("alice"))
    upload(client, alice, mlp_weights())
    response = download(client, "/api/v1/models/ext/versions/1/weights", alice)
    assert response.status_code == 200
