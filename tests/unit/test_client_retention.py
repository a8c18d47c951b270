"""kiln.Client's and the CLI's deletes and --expires-after, against a stubbed HTTP server
(`responses`), as tests/unit/test_client.py does; the rules themselves are the server's
(tests/unit/test_retention_api.py)."""

from __future__ import annotations

import json

import pytest
import responses
from click.testing import CliRunner

from kiln.cli import main
from kiln.client import ApiError, Client
from kiln.client_cli import ExitCode

URL = "http://kiln.test"
JOB = {"id": "j" * 32, "kind": "echo", "state": "queued", "progress": 0.0, "message": ""}


@pytest.fixture
def api() -> responses.RequestsMock:
    with responses.RequestsMock() as mock:
        yield mock


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), env={"KILN_URL": URL, "KILN_API_KEY": "k"})


def test_delete_job_and_model_send_deletes(api) -> None:
    api.delete(f"{URL}/api/v1/jobs/abc", status=204)
    api.delete(f"{URL}/api/v1/models/digits", status=204)

    Client(URL, "k").delete_job("abc")
    Client(URL, "k").delete_model("digits")

    assert [c.request.method for c in api.calls] == ["DELETE", "DELETE"]


def test_a_refused_delete_is_an_api_error_with_its_code(api) -> None:
    body = {"status": 409, "code": "illegal_transition", "detail": "job abc is running"}
    api.delete(f"{URL}/api/v1/jobs/abc", json=body, status=409)

    with pytest.raises(ApiError) as caught:
        Client(URL, "k").delete_job("abc")

    assert (caught.value.status, caught.value.code) == (409, "illegal_transition")


def test_kiln_delete_and_models_delete(api) -> None:
    api.delete(f"{URL}/api/v1/jobs/abc", status=204)
    body = {"status": 409, "code": "in_use", "detail": "model 'm' has aliases"}
    api.delete(f"{URL}/api/v1/models/m", json=body, status=409)

    deleted = invoke("delete", "abc")
    refused = invoke("models", "delete", "m")

    assert deleted.exit_code == ExitCode.OK
    assert deleted.stdout == "deleted abc\n"
    assert refused.exit_code == ExitCode.API_ERROR
    assert "model 'm' has aliases" in refused.stderr


def test_submit_sends_expires_after_only_when_given(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)

    assert invoke("submit", "echo", "--expires-after", "3600").exit_code == 0
    assert invoke("submit", "echo").exit_code == 0

    sent = [json.loads(call.request.body) for call in api.calls]
    assert sent[0]["expires_after"] == 3600
    assert "expires_after" not in sent[1]


def test_a_non_positive_expires_after_is_a_usage_error() -> None:
    result = invoke("submit", "echo", "--expires-after", "0")

    assert result.exit_code == ExitCode.USAGE


MODEL = {"name": "digits", "aliases": {}, "versions": []}


def test_unalias_client_and_async_client_send_the_alias_delete(api) -> None:
    import asyncio

    import httpx

    from kiln import AsyncClient

    api.delete(f"{URL}/api/v1/models/digits/aliases/production", json=MODEL)
    result = invoke("models", "unalias", "digits", "production")
    assert result.exit_code == ExitCode.OK
    assert result.stdout == "removed digits:production\n"
    api.delete(f"{URL}/api/v1/models/digits/aliases/staging", json=MODEL)
    assert Client(URL, "k").delete_alias("digits", "staging") == MODEL
    assert [c.request.url for c in api.calls] == [
        f"{URL}/api/v1/models/digits/aliases/production",
        f"{URL}/api/v1/models/digits/aliases/staging",
    ]

    seen: list[tuple[str, str]] = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        return httpx.Response(200, json=MODEL)

    async def remove() -> dict:
        http = httpx.AsyncClient(transport=httpx.MockTransport(reply))
        async with AsyncClient(URL, "k", http=http) as client:
            return await client.delete_alias("digits", "production")

    assert asyncio.run(remove()) == MODEL
    assert seen == [("DELETE", "/api/v1/models/digits/aliases/production")]


def test_unalias_of_a_missing_alias_is_an_api_error(api) -> None:
    body = {"status": 404, "code": "not_found", "detail": "model 'digits' has no alias 'x'"}
    api.delete(f"{URL}/api/v1/models/digits/aliases/x", json=body, status=404)

    result = invoke("models", "unalias", "digits", "x")

    assert result.exit_code != ExitCode.OK
    assert "has no alias 'x'" in result.stderr


def test_expires_after_below_the_servers_minimum_is_a_usage_error_naming_it() -> None:
    result = invoke("submit", "echo", "--expires-after", "59")

    assert result.exit_code == ExitCode.USAGE
    assert "60<=x" in result.stderr


def test_json_deletes_print_json(api) -> None:
    api.delete(f"{URL}/api/v1/jobs/abc", status=204)
    api.delete(f"{URL}/api/v1/models/m", status=204)

    job = invoke("--json", "delete", "abc")
    model = invoke("--json", "models", "delete", "m")

    assert json.loads(job.stdout) == {"deleted": "abc"}
    assert json.loads(model.stdout) == {"deleted": "m"}


def test_logs_of_an_expired_job_say_so_on_stderr(api) -> None:
    api.get(f"{URL}/api/v1/jobs/abc/events", json={"events": []})
    api.get(f"{URL}/api/v1/jobs/abc", json={**JOB, "state": "succeeded", "expired": True})

    result = invoke("logs", "abc")

    assert result.exit_code == ExitCode.OK
    assert result.stdout == ""
    assert "job abc expired: its log lines were removed" in result.stderr
