"""The job page says only what applies: no charts or log for a finished job that has none,
never "yet" once a job has ended, the state said once, and a log box that follows its tail."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job
from tests.unit.test_ui import _sign_in


@pytest.fixture
def as_alice(client: FlaskClient, create_key: Callable[..., str]) -> FlaskClient:
    _sign_in(client, create_key("alice"))
    return client


def test_a_finished_batch_job_shows_no_empty_charts_or_log(
    as_alice: FlaskClient, create_job: Callable[..., Job]
) -> None:
    job = create_job(owner="alice", kind="batch_predict", state="succeeded")
    page = as_alice.get(f"/jobs/{job.id}").text
    assert "yet" not in page
    assert "Training curves" not in page
    assert "<h2>Log</h2>" not in page
    assert '<span id="job-message"></span>' in page  # "succeeded" is the badge's to say
    assert "<h2>Log</h2>" not in as_alice.get(f"/jobs/{job.id}/log").text


def test_a_finished_training_job_without_metrics_says_none_were_reported(
    as_alice: FlaskClient, create_job: Callable[..., Job]
) -> None:
    job = create_job(owner="alice", kind="train", state="failed")
    page = as_alice.get(f"/jobs/{job.id}").text
    assert "No metrics were reported." in page
    assert "yet" not in page


def test_a_running_job_waits_for_its_first_lines_and_points(
    as_alice: FlaskClient, create_job: Callable[..., Job]
) -> None:
    job = create_job(owner="alice", kind="train", state="running")
    page = as_alice.get(f"/jobs/{job.id}").text
    assert "No metrics reported yet." in page
    assert "No log lines yet." in page
    running_batch = create_job(owner="alice", kind="batch_predict", state="running")
    assert "Training curves" not in as_alice.get(f"/jobs/{running_batch.id}").text


def test_any_job_with_metrics_gets_its_charts(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = create_job(owner="alice", kind="optimize", state="succeeded")
    with sessions() as session:
        jobs.record_metrics(session, job.id, [("val_accuracy", 1, 0.9)])
        session.commit()
    page = as_alice.get(f"/jobs/{job.id}").text
    assert 'id="charts-card"' in page
    assert "No metrics" not in page
    assert "<h2>Metrics</h2>" in page  # not "Training curves": it trained nothing
    assert 'data-x-label="step"' in page


def test_a_batch_jobs_rates_are_charted_by_rows_scored(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = create_job(owner="alice", kind="batch_predict", state="succeeded")
    with sessions() as session:
        jobs.record_metrics(session, job.id, [("rows_per_s", 16, 900.0)])
        session.commit()
    page = as_alice.get(f"/jobs/{job.id}").text
    assert "<h2>Metrics</h2>" in page
    assert 'data-x-label="rows scored"' in page
    assert "Training curves" not in page


def test_the_log_box_lists_oldest_to_newest_and_follows_its_tail(
    as_alice: FlaskClient, create_job: Callable[..., Job], sessions: sessionmaker[Session]
) -> None:
    job = create_job(owner="alice", kind="train", state="running")
    with sessions() as session:
        for step in range(250):
            jobs.log(session, job.id, f"step {step:03d}")
        session.commit()
    page = as_alice.get(f"/jobs/{job.id}").text
    assert 'id="log-lines"' in page
    assert "kiln-log.js" in page  # keeps the box at its newest line across htmx swaps
    assert "step 049" not in page  # the tail: the newest 200 lines
    assert page.index("step 050") < page.index("step 249")
    fragment = as_alice.get(f"/jobs/{job.id}/log").text
    assert 'id="log-lines"' in fragment
    assert fragment.rstrip().endswith("</div>")
    assert fragment.index("step 248") < fragment.index("step 249")
