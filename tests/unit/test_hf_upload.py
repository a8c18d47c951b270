"""Hugging Face model directories: what the web accepts, and everything it refuses before
anything is stored (pickles under any name, zips, remote code, hostile tars, bad shards)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
from hfkit import bert_directory

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return bert_directory(tmp_path_factory.mktemp("bert") / "tiny-bert", "embedding")


@pytest.fixture(scope="module")
def sharded_bert(tmp_path_factory) -> Path:
    """The same kind of model saved in shards, with model.safetensors.index.json."""
    from transformers import AutoModel

    directory = bert_directory(tmp_path_factory.mktemp("sharded") / "bert", "embedding")
    model = AutoModel.from_pretrained(directory, local_files_only=True)
    (directory / "model.safetensors").unlink()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB")
    return directory


def files_of(directory: Path, **replace: bytes | None) -> dict[str, bytes]:
    found = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    for name, content in replace.items():
        name = name.replace("__", ".")
        if content is None:
            found.pop(name, None)
        else:
            found[name] = content
    return found


def push(client, headers, files: dict[str, bytes], task="embedding", name="enc", **form):
    data = {
        "family": "hf",
        "task": task,
        "files": [(io.BytesIO(content), filename) for filename, content in files.items()],
        **form,
    }
    return client.post(f"/api/v1/models/{name}/versions", data=data, headers=headers)


def push_tar(client, headers, members: list[tarfile.TarInfo], contents, filename="m.tar.gz"):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if filename.endswith("gz") else "w") as tar:
        for member, content in zip(members, contents, strict=True):
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
    buffer.seek(0)
    data = {"family": "hf", "task": "embedding", "files": [(buffer, filename)]}
    return client.post("/api/v1/models/enc/versions", data=data, headers=headers)


def directory_tar_members(directory: Path, top: str = "tiny-bert"):
    members, contents = [], []
    for path in sorted(directory.iterdir()):
        info = tarfile.TarInfo(f"{top}/{path.name}")
        content = path.read_bytes()
        info.size = len(content)
        members.append(info)
        contents.append(content)
    return members, contents


def stored_files(settings) -> list[Path]:
    root = settings.artifacts_dir
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def problem(response, status: int, code: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["code"] == code
    return body["detail"]


def test_a_directory_registers_as_an_hf_version_with_its_task(client, alice, tiny_bert):
    response = push(client, alice, files_of(tiny_bert))

    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["family"], body["task"], body["arch"], body["number"]) == (
        "hf",
        "embedding",
        "bert",
        1,
    )
    assert sorted(body["config"]["hf"]["files"]) == sorted(p.name for p in tiny_bert.iterdir())
    assert body["config"]["hf"]["context_length"] == 64
    assert response.headers["Location"] == "/api/v1/models/enc/versions/1"
    shown = client.get("/api/v1/models/enc/versions/1", headers=alice).get_json()
    assert (shown["family"], shown["task"]) == ("hf", "embedding")


def test_a_tar_gz_of_the_directory_stores_the_same_artifact(client, alice, tiny_bert):
    first = push(client, alice, files_of(tiny_bert)).get_json()
    response = push_tar(client, alice, *directory_tar_members(tiny_bert))

    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["artifact_digest"] == first["artifact_digest"]


def test_a_sharded_model_with_its_index_is_accepted(client, alice, sharded_bert):
    names = sorted(p.name for p in sharded_bert.iterdir())
    assert "model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 1

    response = push(client, alice, files_of(sharded_bert))

    assert response.status_code == 201, response.get_data(as_text=True)


def test_a_pickle_renamed_safetensors_is_refused_by_its_bytes(client, alice, tiny_bert, settings):
    renamed = pickle.dumps({"weights": [1.0, 2.0]}, protocol=4)
    response = push(client, alice, files_of(tiny_bert, model__safetensors=renamed))

    assert "pickle" in problem(response, 415, "unsafe_model_file")
    assert stored_files(settings) == []


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "model.ckpt"])
def test_pickle_formats_are_refused_by_name(client, alice, tiny_bert, settings, name):
    files = files_of(tiny_bert) | {name: b"anything at all"}
    assert "pickle" in problem(push(client, alice, files), 415, "unsafe_model_file")
    assert stored_files(settings) == []


def test_a_zip_archive_is_refused(client, alice, tiny_bert, settings):
    response = push(client, alice, files_of(tiny_bert, model__safetensors=b"PK\x03\x04rest"))
    assert "zip" in problem(response, 415, "unsafe_model_file")
    assert stored_files(settings) == []


@pytest.mark.parametrize("document", ["config.json", "tokenizer_config.json"])
def test_a_config_asking_for_remote_code_is_refused(client, alice, tiny_bert, settings, document):
    config = json.loads((tiny_bert / document).read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    files = files_of(tiny_bert) | {document: json.dumps(config).encode()}

    assert "auto_map" in problem(push(client, alice, files), 415, "unsafe_model_file")
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("../evil.json", tarfile.REGTYPE),
        ("/etc/config.json", tarfile.REGTYPE),
        ("tiny-bert/vocab.txt", tarfile.SYMTYPE),
        ("tiny-bert/vocab.txt", tarfile.LNKTYPE),
        ("tiny-bert/vocab.txt", tarfile.CHRTYPE),
    ],
)
def test_hostile_tar_members_are_refused(client, alice, tiny_bert, settings, tmp_path, name, kind):
    members, contents = directory_tar_members(tiny_bert)
    hostile = tarfile.TarInfo(name)
    hostile.type = kind
    if kind == tarfile.REGTYPE:
        hostile.size = 2
    else:
        hostile.linkname = "/etc/passwd"
    response = push_tar(
        client, alice, [*members, hostile], [*contents, b"{}" if kind == tarfile.REGTYPE else None]
    )

    problem(response, 422, "invalid_model_file")
    assert stored_files(settings) == []
    assert not (tmp_path.parent / "evil.json").exists()


def test_a_shard_index_naming_files_not_uploaded_is_refused(client, alice, sharded_bert, settings):
    index = json.loads((sharded_bert / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = "model-00009-of-00009.safetensors"
    files = files_of(sharded_bert) | {"model.safetensors.index.json": json.dumps(index).encode()}

    assert "not uploaded" in problem(push(client, alice, files), 422, "invalid_model_file")
    assert stored_files(settings) == []


def test_an_oversize_shard_index_is_refused(client, alice, sharded_bert, settings):
    index = json.loads((sharded_bert / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] = 10**15
    files = files_of(sharded_bert) | {"model.safetensors.index.json": json.dumps(index).encode()}

    assert "the shards hold" in problem(push(client, alice, files), 422, "invalid_model_file")
    assert stored_files(settings) == []


def test_a_truncated_shard_is_refused(client, alice, tiny_bert, settings):
    weights = (tiny_bert / "model.safetensors").read_bytes()
    response = push(client, alice, files_of(tiny_bert, model__safetensors=weights[:-10]))
    assert "safetensors header says" in problem(response, 422, "invalid_model_file")


def test_a_directory_past_the_upload_limit_is_refused(make_app, alice, tiny_bert, settings):
    client = make_app(max_upload_bytes=20_000).test_client()
    problem(push(client, alice, files_of(tiny_bert)), 413, "payload_too_large")
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"README.md": b"# hi"}, "not part of a transformers model directory"),
        ({"config__json": None}, "no config.json"),
        ({"tokenizer__json": None, "tokenizer_config__json": None}, "no tokenizer"),
        ({"model__safetensors": None}, "no safetensors file"),
    ],
)
def test_incomplete_or_unexpected_directories_are_refused(client, alice, tiny_bert, change, words):
    files = files_of(tiny_bert, **{k: v for k, v in change.items() if "__" in k})
    files |= {k: v for k, v in change.items() if "__" not in k and v is not None}
    assert words in problem(push(client, alice, files), 422, "invalid_model_file")


def test_the_form_names_a_known_family_and_task(client, alice, tiny_bert):
    assert "task" in problem(
        push(client, alice, files_of(tiny_bert), task="chat"), 400, "invalid_request"
    )
    data = {"family": "onnx", "files": [(io.BytesIO(b"x"), "config.json")]}
    response = client.post("/api/v1/models/p/versions", data=data, headers=alice)
    assert "family must be one of" in problem(response, 400, "invalid_request")


def test_a_tar_gz_that_inflates_past_the_limit_stops_early(make_app, alice, settings):
    client = make_app(max_upload_bytes=100_000).test_client()
    info = tarfile.TarInfo("tiny/model.safetensors")
    info.size = 10_000_000  # compresses to a few kB, inflates to 100x the limit
    response = push_tar(client, alice, [info], [b"\0" * info.size])

    problem(response, 413, "payload_too_large")
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    ("filename", "content", "words"),
    [
        ("model.tar", b"not a tar at all" * 100, "not a readable"),
        ("model.tar.gz", b"\x1f\x8b\x08garbage", "not a readable"),
    ],
)
def test_an_unreadable_archive_is_refused(client, alice, filename, content, words):
    data = {"family": "hf", "task": "embedding", "files": [(io.BytesIO(content), filename)]}
    response = client.post("/api/v1/models/enc/versions", data=data, headers=alice)
    assert words in problem(response, 422, "invalid_model_file")


def test_a_part_named_outside_the_directory_is_refused(client, alice, tiny_bert, settings):
    files = files_of(tiny_bert)
    files["../config.json"] = files.pop("config.json")
    assert "'..'" in problem(push(client, alice, files), 422, "invalid_model_file")
    assert stored_files(settings) == []


def test_the_version_records_its_tokenizer_and_context_for_the_model_page(client, alice, tiny_bert):
    version = push(client, alice, files_of(tiny_bert)).get_json()
    tokenizer = version["config"]["tokenizer"]
    assert "tokenizer.json" in tokenizer["files"]
    assert (
        tokenizer["class"]
        == json.loads((tiny_bert / "tokenizer_config.json").read_text())["tokenizer_class"]
    )
    assert version["config"]["context_length"] == version["config"]["hf"]["context_length"]
