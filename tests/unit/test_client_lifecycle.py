"""The client and CLI for tags, deadlines and a queued job's standing (stubbed HTTP)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import responses
from click.testing import CliRunner

from kiln.cli import main
from kiln.client import Client
from kiln.client_cli import ExitCode
from kiln.client_progress import status_line

URL = "http://kiln.test"
JOB = {"id": "j" * 32, "kind": "echo", "state": "queued", "progress": 0.0, "message": "queued"}


@pytest.fixture
def api() -> responses.RequestsMock:
    with responses.RequestsMock() as mock:
        yield mock


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), env={"KILN_URL": URL, "KILN_API_KEY": "k"})


def test_submit_sends_tags_and_a_deadline_beside_the_spec(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    result = invoke(
        "submit", "echo", "--message", "hi", "--tag", "team=nlp", "--tag", "image=repo/x:1",
        "--deadline", "90",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sent = json.loads(api.calls[0].request.body)
    assert sent == {
        "kind": "echo",
        "spec": {"message": "hi"},
        "priority": 0,
        "tags": {"team": "nlp", "image": "repo/x:1"},
        "deadline_s": 90.0,
    }


def test_submit_sends_a_webhook_and_its_events(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    result = invoke(
        "submit", "echo", "--message", "hi", "--webhook", "https://hooks.example.com/kiln",
        "--webhook-event", "running", "--webhook-event", "failed",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sent = json.loads(api.calls[0].request.body)
    assert sent["webhook_url"] == "https://hooks.example.com/kiln"
    assert sent["webhook_events"] == ["running", "failed"]


def test_a_spec_file_may_hold_every_top_level_option(api, tmp_path) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    path: Path = tmp_path / "job.yaml"
    path.write_text(
        "kind: echo\nspec: {message: x}\nexpires_after: 86400\n"
        "webhook_url: https://hooks.example.com/k\nwebhook_events: [failed]\n"
    )
    assert invoke("submit", "-f", str(path), "--webhook-event", "succeeded").exit_code == 0
    sent = json.loads(api.calls[0].request.body)
    assert sent["expires_after"] == 86400
    assert sent["webhook_url"] == "https://hooks.example.com/k"
    assert sent["webhook_events"] == ["succeeded"]  # the flag overrides the file


def test_an_unknown_webhook_event_is_a_usage_error(api) -> None:
    result = invoke("submit", "echo", "--webhook", "https://h.test", "--webhook-event", "done")
    assert result.exit_code == 2
    assert not api.calls


def test_a_spec_file_may_hold_tags_and_a_deadline_and_flags_add_to_them(api, tmp_path) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    path: Path = tmp_path / "job.yaml"
    path.write_text("kind: echo\ntags: {team: nlp}\ndeadline_s: 60\nspec: {message: x}\n")
    assert invoke("submit", "-f", str(path), "--tag", "env=prod").exit_code == 0
    sent = json.loads(api.calls[0].request.body)
    assert (sent["tags"], sent["deadline_s"]) == ({"team": "nlp", "env": "prod"}, 60)


@pytest.mark.parametrize("args", [("--tag", "team"), ("--tag", "=nlp"), ("--deadline", "0")])
def test_a_malformed_tag_or_deadline_is_a_usage_error(api, args: tuple[str, ...]) -> None:
    assert invoke("submit", "echo", *args).exit_code == ExitCode.USAGE
    assert len(api.calls) == 0


def test_jobs_filters_by_every_tag_and_shows_them(api) -> None:
    tagged = {**JOB, "created_at": "2026-12-03T10:00:00+00:00", "tags": {"team": "nlp"}}
    api.get(f"{URL}/api/v1/jobs", json={"jobs": [tagged], "next_cursor": None})
    result = invoke("jobs", "--tag", "team:nlp", "--tag", "env")
    assert result.exit_code == 0, result.output
    query = parse_qs(urlparse(api.calls[0].request.url).query)
    assert query["tag"] == ["team:nlp", "env"]
    assert result.stdout.rstrip().endswith("team=nlp")


def test_the_client_sends_no_tags_or_deadline_unless_given(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    Client(URL, "k").submit("echo", {})
    assert json.loads(api.calls[0].request.body) == {"kind": "echo", "spec": {}, "priority": 0}


def test_status_of_a_queued_job_says_where_it_stands(api) -> None:
    start = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    queued = {
        **JOB,
        "queue": "cpu",
        "tags": {"team": "nlp"},
        "queue_position": 3,
        "estimated_start_at": start,
        "deadline_s": 3600.0,
        "deadline_at": "2026-12-03T11:00:00+00:00",
    }
    api.get(f"{URL}/api/v1/jobs/{JOB['id']}", json=queued)
    result = invoke("status", JOB["id"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "tags team=nlp" in lines
    assert any(line.startswith("position 3 in queue cpu, starts in about 10 min") for line in lines)
    assert "deadline 2026-12-03T11:00:00+00:00 (3600 s after submission)" in lines


def test_the_wait_line_shows_the_position_while_queued_only() -> None:
    queued = {**JOB, "queue": "gpu", "queue_position": 1, "estimated_start_at": None}
    assert status_line(queued) == "queued position 1 in queue gpu"
    running = {**queued, "state": "running", "message": "running"}
    assert status_line(running) == "running"


def test_an_unreachable_server_is_one_line_with_the_sockets_reason() -> None:
    # A real socket: nothing listens on port 1.
    result = CliRunner().invoke(main, ["--url", "http://127.0.0.1:1", "jobs"])
    assert result.exit_code == ExitCode.UNREACHABLE
    assert result.output == "error: cannot reach Kiln at http://127.0.0.1:1: Connection refused\n"
