"""The UI shows a job's tags (list and page), filters the list by them, and shows a queued
job's standing and a job's deadline."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient

from tests.unit.test_ui import _sign_in


@pytest.fixture
def as_alice(client: FlaskClient, create_key: Callable[..., str]) -> FlaskClient:
    _sign_in(client, create_key("alice"))
    return client


@pytest.fixture
def submit(client: FlaskClient, alice: dict[str, str]) -> Callable[..., str]:
    def post(tags: dict[str, str] | None = None, **extra: object) -> str:
        body = {"kind": "echo", "tags": tags or {}, **extra}
        response = client.post("/api/v1/jobs", json=body, headers=alice)
        assert response.status_code == 202, response.get_json()
        return str(response.get_json()["id"])

    return post


def _listed(page: str) -> set[str]:
    return set(re.findall(r'href="/jobs/([0-9a-f]{32})"', page))


def test_the_list_shows_tags_and_its_tag_filter_ands_them(as_alice, submit) -> None:
    both = submit({"team": "nlp", "env": "prod"})
    nlp = submit({"team": "nlp"})
    submit({"team": "vision"})

    page = as_alice.get("/jobs").text
    assert 'class="tag" href="/jobs?tag=team:nlp"' in page
    assert _listed(as_alice.get("/jobs?tag=team:nlp").text) == {both, nlp}
    # The form's one field may hold several filters, separated by spaces.
    filtered = as_alice.get("/jobs?tag=team:nlp+env:prod").text
    assert _listed(filtered) == {both}
    assert 'value="team:nlp env:prod"' in filtered
    table = as_alice.get("/jobs/table?tag=team:nlp&tag=env").text
    assert _listed(table) == {both}


def test_a_malformed_tag_filter_is_said_and_left_out(as_alice, submit) -> None:
    job = submit({"team": "nlp"})
    page = as_alice.get("/jobs?tag=:nlp").text
    assert re.search(r'id="tag-error">tag filter \':nlp\'', page.replace("&#39;", "'"))
    assert job in _listed(page)
    kept = as_alice.get("/jobs?tag=team:nlp+:x").text  # the good filter still applies
    assert 'id="tag-error"' in kept
    assert _listed(kept) == {job}


def test_the_job_page_shows_tags_deadline_and_queue_standing(as_alice, submit) -> None:
    ahead = submit()
    job = submit({"team": "nlp"}, deadline_s=600)

    page = as_alice.get(f"/jobs/{job}").text

    assert re.search(r'id="job-tags">.*team:nlp', page)
    assert "(600 s after submission)" in page
    assert 'id="queue-standing">position 2 on interactive.cpu' in page
    assert "no durations recorded yet" in page
    assert ahead not in page


def test_a_finished_job_shows_no_queue_standing(as_alice, create_job) -> None:
    job = create_job(owner="alice", state="succeeded")
    assert 'id="queue-standing"' not in as_alice.get(f"/jobs/{job.id}").text


def _token(client: FlaskClient) -> str:
    page = client.get("/jobs/new/echo").text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def test_the_job_form_takes_tags_and_a_deadline(as_alice, sessions) -> None:
    form = {"csrf_token": _token(as_alice), "message": "hi", "tags": "team=nlp env=prod"}
    form["deadline_s"] = "90"
    response = as_alice.post("/jobs/new/echo", data=form)

    assert response.status_code == 302, response.text
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    page = as_alice.get(f"/jobs/{job_id}").text
    assert re.search(r'id="job-tags">.*env:prod.*team:nlp', page)
    assert "(90 s after submission)" in page
    resubmit = as_alice.get(f"/jobs/new/echo?from={job_id}").text
    assert 'value="env=prod team=nlp"' in resubmit
    assert 'name="deadline_s" type="text" inputmode="decimal" value="90"' in resubmit


@pytest.mark.parametrize(
    ("tags", "deadline", "field", "says"),
    [
        ("team", "", "tags", "key=value"),
        ("bad:key=x", "", "tags", "bad:key"),
        ("", "-3", "deadline_s", "greater than 0"),
    ],
)
def test_bad_tags_or_deadline_give_the_form_back_with_the_reason(
    as_alice, tags, deadline, field, says
) -> None:
    form = {"csrf_token": _token(as_alice), "tags": tags, "deadline_s": deadline}
    response = as_alice.post("/jobs/new/echo", data=form)

    assert response.status_code == 422
    block = response.text[response.text.index(f'id="f-{field}"') :]
    error = re.search(r'<p class="error" role="alert">([^<]*)</p>', block)
    assert error is not None
    assert says in error.group(1).replace("&#39;", "'")
    assert '<details class="form-group" data-group="advanced" open>' in response.text
