"""The UI is rate-limited like the API (KILN_RATE_LIMIT, per signed-in key, else per
address), and a person over the limit gets a readable 429 page with Retry-After."""

from __future__ import annotations

import re
from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def _token(client: FlaskClient, path: str) -> str:
    found = _TOKEN.search(client.get(path).text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def _jobs(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_job_form_posts_past_the_limit_get_a_429_page_and_submit_nothing(
    make_app: Callable[..., Flask], create_key: Callable[..., str], sessions
) -> None:
    # Generous enough to sign in (by address), then counted against the signed-in key.
    client = make_app(rate_limit="3/minute").test_client()
    token = _token(client, "/signin")
    signed = client.post("/signin", data={"api_key": create_key("alice"), "csrf_token": token})
    assert signed.status_code == 302

    # Signing in starts a fresh session, with a CSRF token of its own.
    form = {"csrf_token": _token(client, "/jobs"), "message": "hi", "priority": "0"}
    answers = [client.post("/jobs/new/echo", data=form) for _ in range(4)]
    statuses = [a.status_code for a in answers]

    assert statuses[-1] == 429, statuses
    accepted = statuses.count(302)
    assert 1 <= accepted < 4
    assert _jobs(sessions) == accepted  # a refused post submitted nothing
    page = answers[-1]
    assert page.mimetype == "text/html"
    assert "429 — Too many requests" in page.text
    assert "nothing was submitted" in page.text
    assert int(page.headers["Retry-After"]) >= 1


def test_the_ui_limit_is_per_signed_in_key(
    make_app: Callable[..., Flask], create_key: Callable[..., str]
) -> None:
    app = make_app(rate_limit="4/minute")
    first, second = app.test_client(), app.test_client()
    for client, owner in ((first, "alice"), (second, "bob")):
        token = _token(client, "/signin")
        client.post("/signin", data={"api_key": create_key(owner), "csrf_token": token})

    statuses = [first.get("/jobs").status_code for _ in range(5)]
    assert statuses[-1] == 429, statuses
    # Bob, from the same address, still has his own allowance.
    assert second.get("/jobs").status_code == 200


def test_signing_in_is_limited_by_address(make_app: Callable[..., Flask]) -> None:
    client = make_app(rate_limit="2/minute").test_client()
    answers = [
        client.post("/signin", data={"api_key": "kiln_guess", "csrf_token": "x"}).status_code
        for _ in range(3)
    ]
    assert answers[-1] == 429


def test_no_rate_limit_when_the_setting_is_empty(make_app: Callable[..., Flask]) -> None:
    client = make_app(rate_limit="").test_client()
    assert all(client.get("/signin").status_code == 200 for _ in range(30))
