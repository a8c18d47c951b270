"""A user with a valid key sending hostile input: every answer is a clear 4xx, never a 500,
a crash or a silently changed value."""

from __future__ import annotations

import io
import json
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from kiln.safejson import MAX_DEPTH

CONFIG = {
    "arch": "mlp",
    "arch_params": {"hidden": [4], "dropout": 0.0},
    "feature_names": ["a", "b", "c"],
    "label_names": ["no", "yes"],
}
_ECHO = '{"kind": "echo", "spec": %s}'


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status
    assert body["code"] == code
    return body


def deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def post_json(client, headers, path: str, text: str | bytes):
    return client.post(path, data=text, content_type="application/json", headers=headers)


def mlp_weights() -> bytes:
    rng = np.random.default_rng(0)
    return save(
        {
            "net.0.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "net.0.bias": np.zeros(4, np.float32),
            "net.3.weight": rng.standard_normal((2, 4)).astype(np.float32),
            "net.3.bias": np.zeros(2, np.float32),
        }
    )


def upload_model(client, headers, weights: bytes, config: str):
    form = {"weights": (io.BytesIO(weights), "m.safetensors"), "config": config}
    return client.post("/api/v1/models/ext/versions", data=form, headers=headers)


# --- nesting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [deep_array(100_000), deep_object(50_000)], ids=["arr", "obj"])
def test_deep_json_is_refused_on_every_route_that_reads_json(client, alice, sent, deep):
    job = post_json(client, alice, "/api/v1/jobs", _ECHO % deep)
    assert_problem(job, 400, "json_too_deep")
    schedule = {"name": "n", "cron": "0 2 * * *", "kind": "echo", "spec": {"message": "x"}}
    text = json.dumps(schedule).replace('"x"', deep)
    assert_problem(post_json(client, alice, "/api/v1/schedules", text), 400, "json_too_deep")
    config = json.dumps(CONFIG).replace("[4]", deep)
    assert_problem(upload_model(client, alice, mlp_weights(), config), 400, "json_too_deep")
    assert sent == []


def test_json_nested_to_the_limit_is_read(client, alice):
    # The echo spec refuses the unknown field, after parsing: a 422 naming it, not a 400.
    nested = "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2)
    response = post_json(client, alice, "/api/v1/jobs", _ECHO % f'{{"extra": {nested}}}')
    body = assert_problem(response, 422, "invalid_spec")
    assert body["errors"][0]["loc"] == ["spec", "extra"]


def test_a_safetensors_header_nested_deeply_is_an_invalid_model_file(client, alice):
    header = json.dumps({"__metadata__": {}}).replace("{}", deep_object(50_000)).encode()
    weights = struct.pack("<Q", len(header)) + header
    body = assert_problem(
        upload_model(client, alice, weights, json.dumps(CONFIG)), 422, "invalid_model_file"
    )
    assert "deeper than" in body["detail"]


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused_naming_the_field(client, alice, sent, literal):
    train = f'{{"kind": "train", "spec": {{"model_name": "m", "lr": {literal}}}}}'
    body = assert_problem(post_json(client, alice, "/api/v1/jobs", train), 422, "invalid_number")
    assert body["errors"][0]["loc"] == ["spec", "lr"]
    assert "must be a finite number" in body["detail"]

    predict = f'{{"kind": "predict", "spec": {{"model": "m", "inputs": [[1, {literal}]]}}}}'
    body = assert_problem(post_json(client, alice, "/api/v1/jobs", predict), 422, "invalid_number")
    assert body["errors"][0]["loc"] == ["spec", "inputs", "0", "1"]
    assert sent == []


@pytest.mark.parametrize("field", ["target_std", "target_mean"])
def test_a_model_config_with_a_non_finite_scale_is_refused(client, alice, field):
    config = json.dumps({**CONFIG, "task": "regression", "label_names": []})
    config = config[:-1] + f', "{field}": NaN}}'
    body = assert_problem(upload_model(client, alice, mlp_weights(), config), 422, "invalid_number")
    assert body["errors"][0]["loc"] == ["config", field]


def test_a_5000_digit_integer_body_says_what_is_wrong(client, alice):
    body = assert_problem(
        post_json(client, alice, "/api/v1/jobs", "9" * 5000), 422, "invalid_number"
    )
    assert "at most 300 digits" in body["detail"]
    huge = f'{{"kind": "echo", "spec": {{"sleep_s": {"9" * 5000}}}}}'
    body = assert_problem(post_json(client, alice, "/api/v1/jobs", huge), 422, "invalid_number")
    assert body["errors"][0]["loc"] == ["spec", "sleep_s"]


def test_a_large_integer_inside_a_spec_is_a_clean_422(client, alice):
    body = f'{{"kind": "train", "spec": {{"model_name": "m", "epochs": {"9" * 250}}}}}'
    problem = assert_problem(post_json(client, alice, "/api/v1/jobs", body), 422, "invalid_spec")
    assert problem["errors"][0]["loc"] == ["spec", "epochs"]


# --- other malformed bodies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"kind": "echo", "kind": "train"}', "appears twice"),
        ('{"kind": "echo", "spec": {"message": "\\ud800"}}', "surrogate"),
        ('["echo"]', "not an array"),
        ('"echo"', "not a string"),
        ("null", "not null"),
        ("{kind: 1}", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_bodies_answer_400_saying_why(client, alice, sent, text, says):
    body = assert_problem(post_json(client, alice, "/api/v1/jobs", text), 400, "invalid_request")
    assert says in body["detail"]
    assert sent == []


@pytest.mark.parametrize(
    "send",
    [
        lambda c, h: c.get("/api/v1/jobs/a%00b", headers=h),
        lambda c, h: c.get("/api/v1/models/a%00b", headers=h),
        lambda c, h: c.get("/api/v1/jobs?kind=echo%00", headers=h),
        lambda c, h: c.post(
            "/api/v1/jobs", json={"kind": "echo"}, headers={**h, "Idempotency-Key": "a\x00"}
        ),
        lambda c, h: c.post(
            "/api/v1/datasets",
            data={"name": "x\x00y", "file": (io.BytesIO(b"a,b\n1,2\n"), "d.csv")},
            headers=h,
        ),
        lambda c, h: c.post(
            "/api/v1/datasets", data={"file": (io.BytesIO(b"a,b\n1,2\n"), "d\x00.csv")}, headers=h
        ),
        lambda c, h: post_json(
            c, h, "/api/v1/schedules", '{"name": "a\\u0000", "cron": "0 2 * * *", "kind": "echo"}'
        ),
    ],
    ids=["path", "model-path", "query", "header", "form-field", "file-name", "json"],
)
def test_a_nul_character_anywhere_is_a_400_not_a_database_error(client, alice, send):
    assert "NUL" in assert_problem(send(client, alice), 400, "invalid_request")["detail"]


def test_a_body_of_another_content_type_names_the_type_it_needs(client, alice):
    response = client.post(
        "/api/v1/jobs", data='{"kind": "echo"}', content_type="text/plain", headers=alice
    )
    assert "application/json" in assert_problem(response, 400, "invalid_request")["detail"]


def test_a_huge_string_is_refused_by_its_field_limit(client, alice, sent):
    text = json.dumps({"kind": "echo", "spec": {"message": "x" * 5_000_000}})
    body = assert_problem(post_json(client, alice, "/api/v1/jobs", text), 422, "invalid_spec")
    assert body["errors"][0]["loc"] == ["spec", "message"]
    assert sent == []


def test_a_json_body_over_its_limit_answers_413(client, alice, monkeypatch):
    from web.api import body

    monkeypatch.setattr(body, "MAX_JSON_BODY_BYTES", 1000)
    text = json.dumps({"kind": "echo", "spec": {"message": "x" * 2000}})
    assert_problem(post_json(client, alice, "/api/v1/jobs", text), 413, "payload_too_large")


def test_werkzeugs_body_limit_answers_as_kilns_413(make_app, alice):
    client = make_app(max_upload_bytes=1024).test_client()
    text = json.dumps({"kind": "echo", "spec": {"message": "x" * (2 * 1024 * 1024)}})
    body = assert_problem(post_json(client, alice, "/api/v1/jobs", text), 413, "payload_too_large")
    assert "larger than" in body["detail"]


# --- headers ---------------------------------------------------------------------------------


def test_only_429_and_503_answers_carry_retry_after(make_app, alice):
    client = make_app(rate_limit="3/minute").test_client()
    refused = post_json(client, alice, "/api/v1/jobs", "[[")  # limits count per route
    answers = [client.get("/api/v1/jobs", headers=alice) for _ in range(4)]
    assert [a.status_code for a in [refused, *answers]] == [400, 200, 200, 200, 429]
    assert all("Retry-After" not in a.headers for a in [refused, *answers[:3]])
    assert "X-RateLimit-Remaining" in answers[0].headers
    assert int(answers[3].headers["Retry-After"]) >= 1


def test_a_submitted_job_has_no_retry_after(client, alice):
    response = client.post("/api/v1/jobs", json={"kind": "echo"}, headers=alice)
    assert response.status_code == 202
    assert "Retry-After" not in response.headers


# --- the UI's forms --------------------------------------------------------------------------

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def as_alice(client, create_key):
    token = _CSRF.search(client.get("/signin").text).group(1)
    response = client.post("/signin", data={"api_key": create_key("alice"), "csrf_token": token})
    assert response.status_code == 302
    return client


def _form(client, path: str, **fields: str):
    token = _CSRF.search(client.get("/jobs").text).group(1)
    return client.post(path, data={"csrf_token": token, **fields})


@pytest.mark.parametrize(
    ("inputs", "says"),
    [
        (deep_array(100_000), "deeper than 32 levels"),
        ("[[1, NaN]]", "must be a finite number"),
        ('[{"a": 1, "a": 2}]', "appears twice"),
    ],
)
def test_the_predict_forms_json_field_refuses_hostile_json_beside_it(as_alice, sent, inputs, says):
    response = _form(as_alice, "/jobs/new/predict", model="m", inputs=inputs)
    assert response.status_code == 422
    assert says in response.text
    assert sent == []


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity"])
def test_the_training_forms_number_fields_refuse_non_finite_text(as_alice, sent, text):
    response = _form(as_alice, "/jobs/new/train", model_name="m", lr=text)
    assert response.status_code == 422
    assert "finite number" in response.text
    assert sent == []


def test_a_ui_dataset_upload_of_a_bomb_shows_the_reason(as_alice):
    bomb = b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n"
    token = _CSRF.search(as_alice.get("/datasets").text).group(1)
    response = as_alice.post(
        "/datasets", data={"csrf_token": token, "file": (io.BytesIO(bomb), "b.jsonl")}
    )
    assert response.status_code == 422
    assert "deeper than 32 levels" in response.text


def test_a_form_with_too_many_parts_answers_as_kilns_413(client, alice):
    fields = {f"f{i}": "x" for i in range(1_100)}  # Werkzeug parses at most 1,000 parts
    fields["file"] = (io.BytesIO(b"a,b\n1,2\n"), "d.csv")
    body = assert_problem(
        client.post("/api/v1/datasets", data=fields, headers=alice), 413, "payload_too_large"
    )
    assert "number of parts" in body["detail"]


@pytest.mark.parametrize(
    "kwargs",
    [
        lambda: {"json": {"file": "d.csv"}},
        lambda: {"data": {"file": "not a file part"}},
        lambda: {"data": {"file": (io.BytesIO(b""), "")}},
    ],
    ids=["json-body", "text-field", "no-file-name"],
)
def test_a_dataset_upload_without_a_file_part_answers_400(client, alice, kwargs):
    response = client.post("/api/v1/datasets", headers=alice, **kwargs())
    body = assert_problem(response, 400, "invalid_request")
    assert "multipart/form-data field 'file'" in body["detail"]


def test_a_model_upload_with_an_empty_weights_part_is_an_invalid_model_file(client, alice):
    response = upload_model(client, alice, b"", json.dumps(CONFIG))
    assert_problem(response, 422, "invalid_model_file")
