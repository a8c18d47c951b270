"""The models and datasets pages as an outside user found them: the row actions of a wide
models table stay in view, the hf upload form shows no disabled Family box, and the
dataset upload hint is true for jobs that need no label."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from db import registry
from tests.unit.test_ui import _sign_in

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

CSS = Path(__file__).parents[2] / "web" / "static" / "kiln.css"
METRICS = ["train_loss", "val_accuracy", "val_f1", "val_loss", "val_mae", "latency_ms_p50"]


@pytest.fixture
def as_alice(client: FlaskClient, create_key: Callable[..., str]) -> FlaskClient:
    _sign_in(client, create_key("alice"))
    return client


def _wide_model(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        registry.register_version(
            session, owner="alice", name="wide", source_job_id=None, arch="mlp",
            config={"feature_names": ["a"], "label_names": ["x", "y"]},
            metrics={name: 0.5 for name in METRICS}, artifact_digest="0" * 64,
            artifact_size=1, dataset_digest=None,
        )  # fmt: skip
        session.commit()


def _rule(selector: str) -> str:
    """The declarations of the CSS rule with exactly this selector."""
    found = re.search(re.escape(selector) + r"\s*\{([^}]*)\}", CSS.read_text())
    assert found, selector
    return found.group(1)


def test_a_wide_models_rows_keep_their_actions_in_view(
    as_alice: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    _wide_model(sessions)
    page = as_alice.get("/models").text

    # Every action of a version row sits in the stacked, sticky actions cell.
    cells = re.findall(r'<td class="row-actions stack">(.*?)</td>', page, re.S)
    assert len(cells) == 1
    assert all(label in cells[0] for label in ("Promote to production", "Predict", "Delete"))
    assert '<th class="row-actions stack"></th>' in page
    sticky = _rule(".table .row-actions.stack")
    assert "position: sticky" in sticky
    assert "right: 0" in sticky
    assert "white-space: normal" in sticky  # the buttons wrap within the column
    # Metric headers may break after an underscore rather than widen the table.
    assert "val_<wbr>accuracy" in page
    assert "white-space: normal" in _rule(".table th.metric")
    # The model's own Delete wraps to the right of its heading, never past the card.
    assert re.search(r'class="small-button button danger end" id="delete-model-', page)
    assert "flex-wrap: wrap" in _rule(".card-head")


def test_the_hf_upload_form_shows_its_family_as_text_not_a_disabled_box(
    as_alice: FlaskClient,
) -> None:
    page = as_alice.get("/models").text
    start = page.index('id="model-upload-form"')
    form = page[start : page.index("</form>", start)]

    assert "disabled" not in form
    assert 'id="model-family"' not in form
    assert '<input type="hidden" name="family" value="hf">' in form
    assert "registered in the <strong>hf</strong> family" in page


def test_the_dataset_hint_asks_for_a_label_only_where_a_job_needs_one(
    as_alice: FlaskClient,
) -> None:
    page = as_alice.get("/datasets").text
    hint = page[page.index("<h2>Upload a dataset</h2>") : page.index('id="upload-form"')]

    assert "and a label column." not in hint
    uses = re.findall(r"<li>(.*?)</li>", hint, re.S)
    assert len(uses) == 2
    assert "target column" in uses[0]
    assert "label" in uses[0]
    assert "embeddings" in uses[1]
    assert "no label is needed" in uses[1]
