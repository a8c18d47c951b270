"""Job forms as people see them: what comes first, the chosen architecture's params only,
Advanced closed, labels in words, the predict form's features and versions, the dataset
picker per kind, and the echo form's chaos switches."""

from __future__ import annotations

import html
import json
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import MultiDict

from db import registry
from db.models import Dataset, Job, Model, ModelVersion
from tests.unit.test_ui import _field_block, _sign_in, _submitted, _token
from web.ui import form_layout, forms_views, model_hints


@pytest.fixture
def as_alice(client: FlaskClient, create_key: Callable[..., str]) -> FlaskClient:
    _sign_in(client, create_key("alice"))
    return client


def _group(page: str, key: str) -> str:
    """The HTML of one group of the form (up to the next group or the actions)."""
    start = page.index(f'data-group="{key}"')
    ends = [page.find(mark, start + 1) for mark in ('data-group="', 'class="actions"')]
    return page[start : min(e for e in ends if e > 0)]


def _inputs(fragment: str) -> set[str]:
    return {part.split('"', 1)[0] for part in fragment.split('id="f-')[1:]}


def _register(
    sessions: sessionmaker[Session], name: str, features: list[str], *, versions: int = 1
) -> None:
    with sessions() as session:
        for _ in range(versions):
            registry.register_version(
                session, owner="alice", name=name, source_job_id=None, arch="mlp",
                config={"feature_names": features, "label_names": ["no", "yes"]},
                metrics={}, artifact_digest="0" * 64, artifact_size=1, dataset_digest=None,
            )  # fmt: skip
        session.commit()


# --- the training form --------------------------------------------------------------------


def test_the_training_form_puts_what_matters_first(as_alice: FlaskClient) -> None:
    page = as_alice.get("/jobs/new/train").text
    first = _group(page, "first")
    assert _inputs(first) == {"model_name", "dataset", "target", "arch", "epochs"}
    order = [first.index(f'id="f-{name}"') for name in ("model_name", "dataset", "target")]
    assert order == sorted(order)
    assert _inputs(_group(page, "main")) == {"batch_size", "lr", "optimizer"}
    assert page.index('data-group="first"') < page.index('data-group="variant"')
    assert page.index('data-group="variant"') < page.index('data-group="advanced"')


def test_advanced_fields_are_collapsed_until_one_has_an_error(as_alice: FlaskClient) -> None:
    page = as_alice.get("/jobs/new/train").text
    advanced = _group(page, "advanced")
    assert {"lr_schedule", "weight_decay", "seed", "precision", "priority"} <= _inputs(advanced)
    assert '<details class="form-group" data-group="advanced">' in page  # closed
    form = {"csrf_token": _token(as_alice, "/jobs"), "model_name": "m", "lr_gamma": "7"}
    refused = as_alice.post("/jobs/new/train", data=form)
    assert refused.status_code == 422
    assert '<details class="form-group" data-group="advanced" open>' in refused.text
    assert "less than or equal to 1" in _field_block(refused.text, "lr_gamma")


def test_fields_are_labelled_in_words(as_alice: FlaskClient) -> None:
    page = as_alice.get("/jobs/new/train").text
    for name, label in [
        ("lr", "learning rate"),
        ("batch_size", "batch size"),
        ("model_name", "model name"),
        ("arch", "architecture"),
        ("arch_params.hidden", "hidden layer sizes"),
    ]:
        assert f'<label for="f-{name}">{label}' in page, name
    assert form_layout.label_for("some_new_field") == "some new field"


@pytest.mark.parametrize(
    ("arch", "shown", "tucked"),
    [
        ("mlp", {"arch_params.hidden", "arch_params.dropout"}, {"arch_params.channels"}),
        ("cnn", {"arch_params.channels", "arch_params.kernel_size", "arch_params.dropout"},
         {"arch_params.hidden", "arch_params.text_column"}),
        ("logreg", set(), {"arch_params.hidden", "arch_params.channels"}),
    ],
)  # fmt: skip
def test_only_the_chosen_architectures_params_are_in_view(
    as_alice: FlaskClient, arch: str, shown: set[str], tucked: set[str]
) -> None:
    """The chosen arch's params in the visible group; the others in a closed group that
    kiln-form.js hides (and fills as the arch changes); without scripts it still works."""
    page = as_alice.get(f"/jobs/new/train?arch={arch}").text
    visible = _group(page, "variant")
    assert _inputs(visible) == shown
    # "This architecture has no parameters of its own." is shown only where that is so.
    assert ("data-none hidden" in visible) == bool(shown)
    others = _group(page, "other-variants")
    assert tucked <= _inputs(others)
    assert not shown & _inputs(others)
    assert "kiln-form.js" in page


def test_a_resubmitted_job_opens_on_its_own_arch(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    form = {"csrf_token": _token(as_alice, "/jobs"), "model_name": "conv", "arch": "cnn"}
    job_id = _submitted(as_alice, "/jobs/new/train", form)
    page = as_alice.get(f"/jobs/new/train?from={job_id}").text
    assert "arch_params.channels" in _inputs(_group(page, "variant"))


# --- the predict form ---------------------------------------------------------------------


def test_the_predict_form_names_the_versions_features_with_an_example_row(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    _register(sessions, "churn", ["tenure", "monthly_fee"])
    page = as_alice.get("/jobs/new/predict?model=churn").text
    rows = _field_block(page, "inputs")
    assert "churn v1 takes 2 features: tenure, monthly_fee." in rows
    example = '[{"tenure": 0, "monthly_fee": 0}]'
    assert f'placeholder="{example}"' in html.unescape(rows)
    # The page carries every model's schema for the script that follows a changed model.
    assert '<script type="application/json" id="model-hints">' in page


def test_the_version_is_picked_by_number_alias_or_latest(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    _register(sessions, "churn", ["tenure"], versions=2)
    with sessions() as session:
        model = registry.get_model(session, "alice", "churn")
        registry.set_alias(session, model, "production", 1)
        session.commit()
    page = as_alice.get("/jobs/new/predict?model=churn").text
    version = _field_block(page, "version")
    assert '<option value="latest" selected>latest (v2)</option>' in version
    assert '<option value="production" >production (v1)</option>' in version
    assert '<option value="1" >v1 · mlp</option>' in version
    pinned = as_alice.get("/jobs/new/predict?model=churn&version=production").text
    assert "churn v1 takes 1 features: tenure." in pinned

    for picked, stored in [("production", "production"), ("2", 2), ("latest", "latest")]:
        form = {"csrf_token": _token(as_alice, "/jobs"), "model": "churn", "version": picked,
                "inputs": '[{"tenure": 3}]'}  # fmt: skip
        job_id = _submitted(as_alice, "/jobs/new/predict", form)
        with sessions() as session:
            assert session.get(Job, job_id).spec["version"] == stored  # type: ignore[union-attr]


def test_a_version_the_lists_do_not_hold_is_kept(as_alice: FlaskClient) -> None:
    page = as_alice.get("/jobs/new/predict?model=gone&version=7").text
    assert '<option value="7" selected>7</option>' in _field_block(page, "version")
    assert "Pick a model to see the features" in _field_block(page, "inputs")


def test_a_version_that_does_not_exist_is_refused_beside_its_field(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """The submit-time checks (web.submit_checks) answer the form as the API: 422, the
    message beside the field, the values kept, nothing queued."""
    _register(sessions, "churn", ["tenure"])
    form = {"csrf_token": _token(as_alice, "/jobs"), "model": "churn", "version": "7",
            "inputs": '[{"tenure": 3}]'}  # fmt: skip
    refused = as_alice.post("/jobs/new/predict", data=form)

    assert refused.status_code == 422
    assert "model &#39;churn&#39; has no version 7" in _field_block(refused.text, "version")
    with sessions() as session:
        assert session.query(Job).count() == 0


def test_examples_stay_short_for_wide_models_and_name_a_text_column() -> None:
    assert model_hints.example_rows(["a", "b"]) == '[{"a": 0, "b": 0}]'
    wide = [f"pixel_{i}" for i in range(64)]
    assert model_hints.example_rows(wide) == "[[" + ", ".join(["0"] * 64) + "]]"
    names = [f"embedding_{i}" for i in range(384)]
    text = Model(name="reviews", aliases={}, versions=[
        ModelVersion(number=1, arch="text", config={
            "input": "text", "text_column": "review", "feature_names": names}),
    ])  # fmt: skip
    described = model_hints.describe([text])["reviews"]["versions"]["1"]
    assert described["features"] == "one text column, 'review'"
    assert json.loads(described["example"]) == [{"review": "a sentence to classify"}]
    digits = Model(name="digits", aliases={}, versions=[
        ModelVersion(number=n, arch="mlp", config={"feature_names": wide}) for n in (1, 2)
    ])  # fmt: skip
    assert model_hints.describe([digits])["digits"]["versions"]["2"]["features"] == (
        "64 features: " + ", ".join(wide[:12]) + " and 52 more"
    )


def test_an_hf_version_is_described_as_taking_texts() -> None:
    tagger = Model(name="ner", aliases={}, versions=[
        ModelVersion(number=1, arch="bert", family="hf", task="token-classification", config={}),
    ])  # fmt: skip
    described = model_hints.describe([tagger])["ner"]["versions"]["1"]
    assert described["features"] == "texts (token-classification): a list of strings"
    example = json.loads(described["example"])
    assert example == ["Ada Lovelace worked in London."]


# --- dataset pickers and the echo form ----------------------------------------------------


def test_the_batch_form_offers_only_uploads(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    """batch_predict reads only uploaded datasets: no built-ins under an 'uploaded' label."""
    with sessions() as session:
        session.add(
            Dataset(owner="alice", name="churn.csv", format="csv", rows=9, columns=[],
                    size_bytes=1, digest="1" * 64)
        )  # fmt: skip
        session.commit()
    batch = _field_block(as_alice.get("/jobs/new/batch_predict").text, "dataset")
    assert "builtin:" not in batch
    assert 'label="Your uploads"' in batch
    assert "churn.csv (9 rows)" in batch
    assert "One of your uploaded datasets." in batch
    train = _field_block(as_alice.get("/jobs/new/train").text, "dataset")
    assert 'label="Built-in"' in train
    assert "churn.csv (9 rows)" in train


def test_the_crash_switch_is_for_admins_where_chaos_is_on(
    make_app: Callable[..., Flask],
    create_key: Callable[..., str],
    sessions: sessionmaker[Session],
) -> None:
    for chaos, role, offered in [
        (False, "user", False), (False, "admin", False), (True, "user", False),
        (True, "admin", True),
    ]:  # fmt: skip
        client = make_app(chaos=chaos).test_client()
        _sign_in(client, create_key(f"{role}-{chaos}".lower(), role=role))
        page = client.get("/jobs/new/echo").text
        assert ('id="f-crash"' in page) is offered, (chaos, role)
        assert ('id="f-hang_s"' in page) is offered, (chaos, role)
        assert 'id="f-message"' in page

    # A forged post cannot set a switch the form does not offer.
    client = make_app(chaos=True).test_client()
    _sign_in(client, create_key("mallory"))
    form = {"csrf_token": _token(client, "/jobs"), "crash": "on", "hang_s": "5", "message": "x"}
    job_id = _submitted(client, "/jobs/new/echo", form)
    with sessions() as session:
        spec = session.get(Job, job_id).spec  # type: ignore[union-attr]
    assert (spec["crash"], spec["hang_s"], spec["message"]) == (False, 0.0, "x")


def test_a_kind_without_a_layout_still_gets_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.specs import TrainSpec
    from web.ui import forms

    fields = forms.fields_for(TrainSpec)
    monkeypatch.delitem(form_layout.LAYOUTS, "train")
    groups = form_layout.grouped("train", fields, {}, {})
    placed = [f.name for g in groups for f in g.fields]
    assert sorted(placed) == sorted(f.name for f in fields)
    assert groups[0].fields[0].name == "model_name"  # the required field first
    assert forms_views.kinds_in_order()[0] == "train"


@pytest.mark.parametrize("kind", ["predict", "batch_predict"])
def test_a_form_sent_as_it_opened_asks_for_no_hf_parameters(kind: str) -> None:
    # A zoo version refuses hf parameters: a form must not send their defaults unasked.
    from kiln.specs import KINDS
    from web.ui import forms

    fields = forms.fields_for(KINDS[kind])
    hf_fields = [f for f in fields if f.name.startswith("hf.")]
    assert hf_fields
    assert all(f.default == "" for f in hf_fields)
    assert "Default: error." in next(f.help for f in hf_fields if f.name == "hf.truncation")
    sent = MultiDict({f.name: f.default for f in fields if f.default})
    raw, errors = forms.spec_from_form(fields, sent)
    assert errors == {}
    assert "hf" not in raw


def test_an_hf_switch_is_sent_only_when_chosen() -> None:
    from kiln.specs import KINDS
    from web.ui import forms

    fields = forms.fields_for(KINDS["predict"])
    raw, _ = forms.spec_from_form(fields, MultiDict({"model": "m", "hf.normalize": "yes"}))
    assert raw["hf"] == {"normalize": True}
