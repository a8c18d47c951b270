"""The browser UI through Flask's test client: sign-in, CSRF, owner rules, forms, escaping."""

from __future__ import annotations

import io
import re
import stat
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from db import jobs, keys, registry
from db.models import Dataset, Job, Model
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from kiln.specs import TrainSpec
from web.secret import secret_key
from web.ui import forms

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def _token(client: FlaskClient, path: str = "/signin") -> str:
    found = _TOKEN.search(client.get(path).text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def _sign_in(client: FlaskClient, key: str) -> None:
    response = client.post("/signin", data={"api_key": key, "csrf_token": _token(client)})
    assert response.status_code == 302


@pytest.fixture
def alice_key(create_key: Callable[..., str]) -> str:
    return create_key("alice")


@pytest.fixture
def as_alice(client: FlaskClient, alice_key: str) -> FlaskClient:
    _sign_in(client, alice_key)
    return client


def _version(sessions: sessionmaker[Session], owner: str, name: str, job_id: str | None) -> None:
    with sessions() as session:
        registry.register_version(
            session, owner=owner, name=name, source_job_id=job_id, arch="mlp", config={},
            metrics={"val_accuracy": 0.9, "val_loss": 0.3}, artifact_digest="0" * 64,
            artifact_size=1, dataset_digest=None,
        )  # fmt: skip
        session.commit()


# --- signing in and out -------------------------------------------------------------------


def test_pages_send_a_visitor_to_sign_in_and_back(client: FlaskClient, alice_key: str) -> None:
    response = client.get("/models")
    assert response.status_code == 302
    assert response.headers["Location"] == "/signin?next=/models"
    token = _token(client)
    signed = client.post(
        "/signin", data={"api_key": alice_key, "csrf_token": token, "next": "/models"}
    )
    assert signed.headers["Location"] == "/models"
    assert client.get("/models").status_code == 200


def test_a_wrong_key_is_refused_beside_the_field(client: FlaskClient) -> None:
    response = client.post("/signin", data={"api_key": "kiln_nope", "csrf_token": _token(client)})
    assert response.status_code == 401
    assert "unknown or revoked" in response.text
    assert client.get("/jobs").status_code == 302


def test_an_empty_key_is_asked_for(client: FlaskClient) -> None:
    response = client.post("/signin", data={"api_key": "  ", "csrf_token": _token(client)})
    assert response.status_code == 401
    assert "Enter your API key." in response.text


def test_sign_out_ends_the_session(as_alice: FlaskClient) -> None:
    assert "alice" in as_alice.get("/jobs").text
    response = as_alice.post("/signout", data={"csrf_token": _token(as_alice, "/jobs")})
    assert response.headers["Location"] == "/signin"
    assert as_alice.get("/jobs").status_code == 302


def test_revoking_the_key_signs_the_browser_out(
    as_alice: FlaskClient, alice_key: str, sessions: sessionmaker[Session]
) -> None:
    with sessions() as session:
        row = keys.authenticate(session, alice_key)
        assert row is not None
        keys.revoke(session, row.id)
        session.commit()
    assert as_alice.get("/jobs").status_code == 302


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "\\\\evil"])
def test_sign_in_never_redirects_off_site(client: FlaskClient, alice_key: str, target: str) -> None:
    data = {"api_key": alice_key, "csrf_token": _token(client), "next": target}
    assert client.post("/signin", data=data).headers["Location"] == "/jobs"


def test_the_session_secret_is_generated_once_with_private_perms(settings: Settings) -> None:
    first = secret_key(settings)
    path = settings.data_dir / "secret_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_key(settings) == first
    assert len(first) >= 32
    assert secret_key(settings.model_copy(update={"secret_key": "from-env"})) == "from-env"


# --- CSRF ---------------------------------------------------------------------------------


def test_sign_in_without_a_csrf_token_is_forbidden(client: FlaskClient, alice_key: str) -> None:
    client.get("/signin")
    assert client.post("/signin", data={"api_key": alice_key}).status_code == 403


@pytest.mark.parametrize(
    "path", ["/jobs/new/echo", "/signout", "/datasets", "/models/x/aliases", "/jobs/x/cancel"]
)
def test_every_form_post_needs_the_sessions_token(as_alice: FlaskClient, path: str) -> None:
    assert as_alice.post(path, data={"message": "hi"}).status_code == 403
    assert as_alice.post(path, data={"csrf_token": "forged"}).status_code == 403


def test_a_cancel_without_token_leaves_the_job_alone(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = create_job(owner="alice")
    assert as_alice.post(f"/jobs/{job.id}/cancel").status_code == 403
    with sessions() as session:
        assert session.get(Job, job.id).state == "queued"  # type: ignore[union-attr]
    token = _token(as_alice, "/jobs")
    assert as_alice.post(f"/jobs/{job.id}/cancel", data={"csrf_token": token}).status_code == 302
    with sessions() as session:
        assert session.get(Job, job.id).state == "cancelled"  # type: ignore[union-attr]


# --- owner isolation ----------------------------------------------------------------------


def test_another_users_objects_are_not_found_on_every_route(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    bobs = create_job(owner="bob", spec={"message": "bob's secret"})
    token = _token(as_alice, "/jobs")
    for path in ["", "/live", "/log", "/metrics.json", "/download/output"]:
        assert as_alice.get(f"/jobs/{bobs.id}{path}").status_code == 404, path
    assert as_alice.get(f"/jobs/new/echo?from={bobs.id}").status_code == 404
    assert as_alice.post(f"/jobs/{bobs.id}/cancel", data={"csrf_token": token}).status_code == 404
    assert bobs.id[:8] not in as_alice.get("/jobs").text
    assert bobs.id[:8] not in as_alice.get("/jobs/table").text

    _version(sessions, "bob", "bobs-model", None)
    with sessions() as session:
        model_id = session.query(Model).filter_by(owner="bob").one().id
        session.add(
            Dataset(owner="bob", name="bobs-data", format="csv", rows=1, columns=[],
                    size_bytes=1, digest="1" * 64)
        )  # fmt: skip
        session.commit()
    assert "bobs-model" not in as_alice.get("/models").text
    assert "bobs-data" not in as_alice.get("/datasets").text
    assert "bobs-data" not in as_alice.get("/jobs/new/train").text
    promote = {"csrf_token": token, "version": "1"}
    assert as_alice.post(f"/models/{model_id}/aliases", data=promote).status_code == 404


def test_an_admin_sees_everyones_jobs(
    client: FlaskClient, create_key: Callable[..., str], create_job: Callable[..., Job]
) -> None:
    bobs = create_job(owner="bob")
    _sign_in(client, create_key("root", role="admin"))
    assert bobs.id[:8] in client.get("/jobs").text
    assert client.get(f"/jobs/{bobs.id}").status_code == 200


# --- forms --------------------------------------------------------------------------------


def test_the_training_form_starts_at_the_spec_defaults(as_alice: FlaskClient) -> None:
    page = as_alice.get("/jobs/new/train").text
    assert 'name="epochs" type="text" inputmode="decimal" value="20"' in page
    assert 'name="lr" type="text" inputmode="decimal" value="0.003"' in page
    assert 'value="128, 64"' in page
    assert '<option value="builtin:digits" selected>' in page


def test_a_valid_form_queues_the_job_and_sends_it(
    as_alice: FlaskClient, sessions: sessionmaker[Session], sent: list
) -> None:
    form = {
        "csrf_token": _token(as_alice, "/jobs/new/train"),
        "model_name": "digits",
        "arch_params.hidden": "32, 16",
        "arch_params.dropout": "0",
        "epochs": "3",
        "optimizer": "sgd",
        "priority": "4",
    }
    job_id = _submitted(as_alice, "/jobs/new/train", form)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.owner == "alice"
        assert job.priority == 4
        assert job.spec["arch_params"] == {"arch": "mlp", "hidden": [32, 16], "dropout": 0.0}
        assert (job.spec["epochs"], job.spec["optimizer"], job.spec["lr"]) == (3, "sgd", 0.003)
        assert job.sent_at is not None  # sent as POST /api/v1/jobs sends it
    assert [s[0] for s in sent] == [job_id]


def _submitted(client: FlaskClient, path: str, form: dict[str, str]) -> str:
    """Post a job form that must be accepted; the id of the job it redirects to."""
    response = client.post(path, data=form)
    assert response.status_code == 302
    return response.headers["Location"].rsplit("/", 1)[1]


def _field_block(page: str, name: str) -> str:
    """The HTML of one field's wrapper div."""
    start = page.index(f'<label for="f-{name}">')
    return page[page.rindex("<div", 0, start) : page.index("</div>", start)]


def test_validation_errors_sit_beside_their_fields_with_values_kept(
    as_alice: FlaskClient, sent: list
) -> None:
    form = {
        "csrf_token": _token(as_alice, "/jobs/new/train"),
        "model_name": "no spaces allowed",
        "epochs": "0",
        "lr": "fast",
        "arch_params.hidden": "64, -1",
        "batch_size": "32",
        "priority": "12",
    }
    response = as_alice.post("/jobs/new/train", data=form)
    assert response.status_code == 422
    page = response.text
    assert "must be 1-100 letters" in _field_block(page, "model_name")
    assert 'value="no spaces allowed"' in _field_block(page, "model_name")
    assert "greater than or equal to 1" in _field_block(page, "epochs")
    assert 'value="0"' in _field_block(page, "epochs")
    assert "valid number" in _field_block(page, "lr")
    assert 'value="fast"' in _field_block(page, "lr")
    assert "greater than or equal to 1" in _field_block(page, "arch_params.hidden")
    assert 'value="64, -1"' in _field_block(page, "arch_params.hidden")
    assert 'value="32"' in _field_block(page, "batch_size")
    assert 'class="error"' not in _field_block(page, "batch_size")
    assert "0 to 9" in _field_block(page, "priority")
    assert sent == []


def test_bad_json_is_reported_beside_its_field(as_alice: FlaskClient) -> None:
    form = {"csrf_token": _token(as_alice, "/jobs"), "model": "m", "inputs": "[[1, 2"}
    response = as_alice.post("/jobs/new/predict", data=form)
    assert response.status_code == 422
    assert "not valid JSON" in _field_block(response.text, "inputs")
    assert "[[1, 2</textarea>" in _field_block(response.text, "inputs")


def test_only_the_chosen_architectures_params_are_read(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """Every arch's params are on the form; the MLP's defaults must not reach a CNN spec."""
    page = as_alice.get("/jobs/new/train").text
    assert "Used when architecture is cnn." in _field_block(page, "arch_params.channels")
    form = {
        "csrf_token": _token(as_alice, "/jobs"),
        "model_name": "conv",
        "arch": "cnn",
        "arch_params.hidden": "128, 64",
        "arch_params.channels": "8, 16",
        "arch_params.kernel_size": "5",
        "arch_params.dropout": "0.2",
    }
    job_id = _submitted(as_alice, "/jobs/new/train", form)
    with sessions() as session:
        spec = session.get(Job, job_id).spec  # type: ignore[union-attr]
    assert spec["arch_params"] == {
        "arch": "cnn", "channels": [8, 16], "kernel_size": 5, "dropout": 0.2
    }  # fmt: skip

    bad = as_alice.post("/jobs/new/train", data={**form, "arch_params.channels": "0"})
    assert bad.status_code == 422
    assert "greater than or equal to 1" in _field_block(bad.text, "arch_params.channels")


def test_a_user_over_the_queue_quota_is_told_so_on_the_form(
    make_app: Callable[..., Flask],
    create_key: Callable[..., str],
    create_job: Callable[..., Job],
    sent: list,
) -> None:
    """The form applies the API's quota (429 there) and says why, keeping the values."""
    client = make_app(max_queued_per_owner=1).test_client()
    _sign_in(client, create_key("alice"))
    create_job(owner="alice")
    form = {"csrf_token": _token(client, "/jobs"), "message": "one too many"}
    response = client.post("/jobs/new/echo", data=form)
    assert response.status_code == 429
    assert "max_queued_per_owner=1" in response.text
    assert "one too many" in _field_block(response.text, "message")
    assert sent == []


def test_resubmit_fills_the_form_from_the_job(
    as_alice: FlaskClient, create_job: Callable[..., Job]
) -> None:
    spec = TrainSpec(model_name="again", epochs=7).model_dump(mode="json")
    job = create_job(owner="alice", kind="train", spec=spec, priority=3)
    page = as_alice.get(f"/jobs/new/train?from={job.id}").text
    assert 'value="again"' in _field_block(page, "model_name")
    assert 'value="7"' in _field_block(page, "epochs")
    assert 'value="3"' in _field_block(page, "priority")


@pytest.mark.parametrize("path", ["/nothing-here", "/jobs/", "/static/nope.css"])
def test_an_unknown_address_is_the_uis_page_for_a_browser_and_json_for_the_rest(
    as_alice: FlaskClient, path: str
) -> None:
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    page = as_alice.get(path, headers=browser)
    assert (page.status_code, page.mimetype) == (404, "text/html")
    assert "404 — Not found" in page.get_data(as_text=True)
    for accept in ("*/*", "application/json"):  # curl, an API client
        answer = as_alice.get(path, headers={"Accept": accept})
        assert (answer.status_code, answer.mimetype) == (404, "application/problem+json")
    api = as_alice.get("/api/v1/nothing-here", headers=browser)
    assert api.mimetype == "application/problem+json"  # the API is JSON, even to a browser


def test_unknown_kinds_have_no_form(as_alice: FlaskClient) -> None:
    assert as_alice.get("/jobs/new/nope").status_code == 404


def test_fields_follow_the_spec() -> None:
    by_name = {f.name: f for f in forms.fields_for(TrainSpec)}
    assert by_name["model_name"].required
    assert by_name["model_name"].widget == "text"
    assert by_name["optimizer"].choices == ["sgd", "adam", "adamw"]
    assert by_name["dataset"].widget == "dataset"
    assert by_name["arch_params.hidden"].widget == "list"
    assert by_name["epochs"].default == "20"


# --- pages --------------------------------------------------------------------------------


def test_job_page_shows_state_progress_log_and_cancel(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = create_job(owner="alice", state="running")
    with sessions() as session:
        jobs.report_progress(session, job.id, 1, 0.42, "epoch 5/12, ETA 33s")
        jobs.log(session, job.id, "epoch 5: train_loss=0.5")
        jobs.record_metrics(session, job.id, [("train_loss", 1, 0.9), ("train_loss", 2, 0.5)])
        session.commit()
    page = as_alice.get(f"/jobs/{job.id}").text
    assert 'value="42.0"' in page
    assert "epoch 5/12, ETA 33s" in page
    assert "epoch 5: train_loss=0.5" in page
    assert "Cancel job" in page
    assert 'hx-trigger="every 2s, kiln:update"' in as_alice.get(f"/jobs/{job.id}/live").text
    metrics = as_alice.get(f"/jobs/{job.id}/metrics.json").get_json()
    assert metrics == {
        "state": "running",
        "terminal": False,
        "series": {"train_loss": [[1, 0.9], [2, 0.5]]},
    }


def test_the_result_names_the_model_a_job_made_or_used(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    trained = create_job(owner="alice", kind="train", state="succeeded")
    used = create_job(owner="alice", kind="predict", state="succeeded")
    with sessions() as session:
        for job_id in (trained.id, used.id):
            session.get(Job, job_id).result = {"model": "digits", "version": 2}  # type: ignore[union-attr]
        session.commit()
    assert "Registered" in as_alice.get(f"/jobs/{trained.id}").text
    page = as_alice.get(f"/jobs/{used.id}").text
    assert "Registered" not in page
    assert "digits version 2" in page


def test_a_finished_jobs_page_stops_polling(
    as_alice: FlaskClient, create_job: Callable[..., Job]
) -> None:
    job = create_job(owner="alice", state="succeeded")
    assert "hx-trigger" not in as_alice.get(f"/jobs/{job.id}/live").text
    assert "hx-trigger" not in as_alice.get(f"/jobs/{job.id}/log").text
    assert "Cancel job" not in as_alice.get(f"/jobs/{job.id}").text


def test_the_jobs_list_filters_by_state_and_kind(
    as_alice: FlaskClient, create_job: Callable[..., Job]
) -> None:
    queued = create_job(owner="alice")
    done = create_job(owner="alice", state="succeeded")
    table = as_alice.get("/jobs/table?state=succeeded").text
    assert done.id[:8] in table
    assert queued.id[:8] not in table
    assert queued.id[:8] not in as_alice.get("/jobs?kind=train").text


def test_markup_in_user_text_is_escaped(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    evil = "<script>alert(1)</script>"
    job = create_job(owner="alice", state="running", spec={"message": evil})
    with sessions() as session:
        jobs.report_progress(session, job.id, 1, 0.1, evil)
        jobs.log(session, job.id, evil)
        session.commit()
    _version(sessions, "alice", evil, job.id)  # the registry layer takes any name
    pages = [f"/jobs/{job.id}", "/jobs", "/models", f"/jobs/{job.id}/live", f"/jobs/{job.id}/log"]
    for path in pages:
        text = as_alice.get(path).text
        assert "<script>alert" not in text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path


def test_pages_carry_security_headers_and_the_api_is_unchanged(
    as_alice: FlaskClient, alice: dict[str, str]
) -> None:
    headers = as_alice.get("/jobs").headers
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert "script-src 'self';" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    api = as_alice.get("/api/v1/jobs", headers=alice)
    assert api.status_code == 200
    # The API keeps its own (web.headers) policy, not the pages' one.
    assert "script-src" not in api.headers["Content-Security-Policy"]
    # A browser session is no API key: the API still wants a Bearer header.
    assert as_alice.get("/api/v1/jobs").status_code == 401


def test_upload_through_the_form_and_by_xhr(as_alice: FlaskClient) -> None:
    token = _token(as_alice, "/datasets")
    csv = b"a,b,label\n1,2,0\n3,4,1\n"
    plain = as_alice.post(
        "/datasets",
        data={"csrf_token": token, "name": "tiny", "file": (io.BytesIO(csv), "t.csv")},
    )
    assert plain.status_code == 302
    assert plain.headers["Location"] == "/datasets"
    assert "Uploaded tiny: 2 rows." in as_alice.get("/datasets").text
    xhr = as_alice.post(
        "/datasets",
        data={"file": (io.BytesIO(csv), "t.csv")},
        headers={"X-CSRF-Token": token, "X-Requested-With": "XMLHttpRequest"},
    )
    assert xhr.status_code == 200
    assert xhr.get_json()["redirect"] == "/datasets"
    assert xhr.get_json()["dataset"]["rows"] == 2


def test_a_bad_upload_is_explained_beside_the_file_field(as_alice: FlaskClient) -> None:
    data = {
        "csrf_token": _token(as_alice, "/datasets"),
        "name": "kept",
        "file": (io.BytesIO(b"x"), "t.bin"),
    }
    response = as_alice.post("/datasets", data=data)
    assert response.status_code == 422
    assert "supported formats are csv" in response.text
    assert 'value="kept"' in response.text


def test_promote_a_version_to_production(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = create_job(owner="alice", kind="train", state="succeeded")
    _version(sessions, "alice", "digits", job.id)
    _version(sessions, "alice", "digits", None)
    with sessions() as session:
        model_id = session.query(Model).filter_by(name="digits").one().id
    page = as_alice.get("/models").text
    assert "val_<wbr>accuracy" in page  # a metric's header may break after its underscore
    assert "0.9" in page
    assert job.id[:8] in page
    token = _token(as_alice, "/models")
    promote = as_alice.post(
        f"/models/{model_id}/aliases", data={"csrf_token": token, "version": "1"}
    )
    assert promote.status_code == 302
    assert "production → v1" in as_alice.get("/models").text
    with sessions() as session:
        assert session.get(Model, model_id).aliases == {"production": 1}  # type: ignore[union-attr]
    missing = {"csrf_token": token, "version": "9"}
    assert as_alice.post(f"/models/{model_id}/aliases", data=missing).status_code == 404


def _finish_with(sessions: sessionmaker[Session], job_id: str, result: dict[str, Any]) -> None:
    with sessions() as session:
        session.get(Job, job_id).result = result  # type: ignore[union-attr]
        session.commit()


def test_stored_files_are_offered_and_served_by_the_api_views(
    as_alice: FlaskClient,
    create_job: Callable[..., Job],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    content = b"id,prediction\n1,a\n2,b\n"
    stored = ArtifactStore(settings.artifacts_dir).put_bytes(content)
    described = {"digest": stored.digest, "size": stored.size, "format": "csv", "rows": 2}
    scored = create_job(owner="alice", kind="batch_predict", state="succeeded")
    _finish_with(sessions, scored.id, {"rows": 2, "output": described, "error_file": None})

    page = as_alice.get(f"/jobs/{scored.id}").text
    assert f'href="/jobs/{scored.id}/download/output"' in page
    assert "csv, 2 rows" in page
    assert "Download errors" not in page  # error_file is None: nothing was stored
    with as_alice.get(f"/jobs/{scored.id}/download/output") as download:
        assert download.status_code == 200
        assert download.data == content
        assert download.mimetype == "text/csv"
        assert f"{scored.id}-output.csv" in download.headers["Content-Disposition"]
    assert as_alice.get(f"/jobs/{scored.id}/download/errors").status_code == 404
    assert as_alice.get(f"/jobs/{scored.id}/download/model").status_code == 404

    # Only an entry that names a stored file counts, not a key that merely looks like one.
    counted = create_job(owner="alice", state="succeeded")
    _finish_with(sessions, counted.id, {"output_rows": 3, "errors": 0})
    assert "Download" not in as_alice.get(f"/jobs/{counted.id}").text
    assert as_alice.get(f"/jobs/{counted.id}/download/output").status_code == 404

    bobs = create_job(owner="bob", kind="batch_predict", state="succeeded")
    _finish_with(sessions, bobs.id, {"output": described})
    assert as_alice.get(f"/jobs/{bobs.id}/download/output").status_code == 404
