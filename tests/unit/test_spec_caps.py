"""Per-field caps on a spec's free text: a huge string is a 422 naming the field, never
stored; what is legitimately large (a predict job's texts) is not capped per field."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import func, select

from db.models import Dataset, Job
from kiln.errors import InvalidSpec
from kiln.specs import parse_spec

HUGE = "a" * 10_000_000  # 10 MB
BATCH = {"model": "m", "dataset": "d"}


@pytest.mark.parametrize(
    ("kind", "raw", "loc"),
    [
        ("predict", {"model": HUGE, "inputs": [[1]]}, ["spec", "model"]),
        ("export", {"model": HUGE}, ["spec", "model"]),
        ("optimize", {"model": "m", "dataset": HUGE}, ["spec", "dataset"]),
        ("optimize", {"model": "m", "target": HUGE}, ["spec", "target"]),
        ("batch_predict", {"model": "m", "dataset": HUGE}, ["spec", "dataset"]),
        ("batch_predict", {**BATCH, "features": [HUGE]}, ["spec", "features", "0"]),
        ("batch_predict", {**BATCH, "passthrough": [HUGE]}, ["spec", "passthrough", "0"]),
        ("train", {"model_name": "m", "dataset": HUGE}, ["spec", "dataset"]),
        ("train", {"model_name": "m", "target": HUGE}, ["spec", "target"]),
        ("train", {"model_name": "m", "resume_from": HUGE}, ["spec", "resume_from"]),
        ("echo", {"fail_with": HUGE}, ["spec", "fail_with"]),
    ],
)  # fmt: skip
def test_a_huge_string_is_refused_naming_its_field(kind: str, raw: dict, loc: list[str]) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(kind, raw)

    assert caught.value.details[0]["loc"] == loc
    assert "at most" in caught.value.details[0]["msg"]


def test_the_caps_leave_ordinary_values_and_long_texts_alone() -> None:
    parse_spec("predict", {"model": "m" * 100, "inputs": ["a long document " * 10_000]})
    parse_spec("train", {"model_name": "m", "dataset": "builtin:breast_cancer", "target": "t"})
    parse_spec("echo", {"fail_with": "x" * 10_000})


def test_the_api_refuses_a_huge_field_and_stores_nothing(client, alice, sessions) -> None:
    body = {"kind": "echo", "spec": {"fail_with": HUGE}}
    response = client.post("/api/v1/jobs", json=body, headers=alice)

    assert response.status_code == 422
    assert response.get_json()["errors"][0]["loc"] == ["spec", "fail_with"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_a_dataset_name_longer_than_its_column_is_refused_before_storing(
    client, alice, sessions
) -> None:
    content = b"x,label\n1,a\n2,b\n"
    data = {"file": (io.BytesIO(content), "data.csv"), "name": "n" * 256}
    response = client.post("/api/v1/datasets", data=data, headers=alice)

    assert response.status_code == 400
    assert response.get_json()["errors"] == [{"loc": ["name"], "msg": "at most 255 characters"}]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0
    fits = {"file": (io.BytesIO(content), "data.csv"), "name": "n" * 255}
    assert client.post("/api/v1/datasets", data=fits, headers=alice).status_code == 201
