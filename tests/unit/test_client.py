"""kiln.Client and the CLI's own parsing, against a stubbed HTTP server (`responses`).

The real server, broker and worker are exercised in tests/integration/ops/test_ops_cli.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner

import kiln
from kiln.cli import main
from kiln.client import ApiError, AuthError, Client, NotFoundError
from kiln.client_cli import ExitCode

URL = "http://kiln.test"
JOB = {"id": "j" * 32, "kind": "train", "state": "queued", "progress": 0.0, "message": ""}


@pytest.fixture
def api() -> responses.RequestsMock:
    with responses.RequestsMock() as mock:
        yield mock


def test_import_kiln_stays_light_and_exports_client_lazily() -> None:
    code = "import sys, kiln; assert 'requests' not in sys.modules; kiln.Client; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
    assert kiln.Client is Client


def test_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, api) -> None:
    monkeypatch.setenv("KILN_URL", URL + "/")
    monkeypatch.setenv("KILN_API_KEY", "secret")
    api.get(f"{URL}/api/v1/jobs/x", json=JOB)
    Client().job("x")
    assert api.calls[0].request.headers["Authorization"] == "Bearer secret"


@pytest.mark.parametrize(
    ("status", "kind"), [(404, NotFoundError), (401, AuthError), (403, AuthError), (500, ApiError)]
)
def test_problem_answers_become_typed_errors(api, status: int, kind: type[ApiError]) -> None:
    body = {"status": status, "code": "some_code", "detail": "what happened", "errors": []}
    api.get(f"{URL}/api/v1/jobs/x", json=body, status=status)
    with pytest.raises(kind) as caught:
        Client(URL, "k").job("x")
    assert (caught.value.status, caught.value.code, caught.value.detail) == (
        status, "some_code", "what happened",
    )  # fmt: skip


def test_an_error_without_a_problem_body_still_has_a_code(api) -> None:
    api.get(f"{URL}/api/v1/jobs/x", body="<html>bad gateway</html>", status=502)
    with pytest.raises(ApiError) as caught:
        Client(URL, "k").job("x")
    assert caught.value.code == "http_502"


def test_download_keeps_the_servers_file_name_and_reports_progress(api, tmp_path: Path) -> None:
    api.get(
        f"{URL}/api/v1/jobs/j/output",
        body=b"a,b\n1,2\n",
        headers={"Content-Disposition": 'attachment; filename="../../predictions.csv"'},
    )
    seen: list[int] = []
    path = Client(URL, "k").download_output("j", tmp_path, lambda done, total: seen.append(done))
    assert path == tmp_path / "predictions.csv"  # never outside the folder asked for
    assert path.read_bytes() == b"a,b\n1,2\n"
    assert seen[-1] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_jobs_follow_the_cursor_until_the_limit(api) -> None:
    page = lambda n, cursor: {"jobs": [{**JOB, "id": f"{n}{i}"} for i in range(2)],  # noqa: E731
                              "next_cursor": cursor}  # fmt: skip
    api.get(f"{URL}/api/v1/jobs", json=page("a", "c1"))
    api.get(f"{URL}/api/v1/jobs", json=page("b", None))
    assert [j["id"] for j in Client(URL, "k").jobs(limit=3)] == ["a0", "a1", "b0"]
    assert "cursor=c1" in api.calls[1].request.url


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), env={"KILN_URL": URL, "KILN_API_KEY": "k"})


def test_submit_flags_become_a_typed_nested_spec(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    result = invoke(
        "submit", "train", "--model-name", "digits", "--epochs", "20", "--lr=0.01",
        "--arch-params.hidden", "[32, 16]", "--priority", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == JOB["id"]
    sent = json.loads(api.calls[0].request.body)
    assert sent == {
        "kind": "train",
        "spec": {
            "model_name": "digits",
            "epochs": 20,
            "lr": 0.01,
            "arch_params": {"hidden": [32, 16]},
        },
        "priority": 5,
    }


def test_a_spec_file_is_read_and_flags_override_it(api, tmp_path: Path) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    spec = tmp_path / "job.yaml"
    spec.write_text("kind: train\npriority: 2\nspec:\n  model_name: a\n  epochs: 3\n")
    assert invoke("submit", "-f", str(spec), "--epochs", "7").exit_code == 0
    sent = json.loads(api.calls[0].request.body)
    assert sent == {"kind": "train", "spec": {"model_name": "a", "epochs": 7}, "priority": 2}


@pytest.mark.parametrize(
    "args",
    [
        ("submit",),  # no kind
        ("submit", "echo", "stray"),
        ("submit", "echo", "--message"),
        ("submit", "-f", "/no/such/file.yaml"),
    ],
)
def test_bad_usage_exits_2_without_calling_the_api(api, args: tuple[str, ...]) -> None:
    assert invoke(*args).exit_code == ExitCode.USAGE
    assert len(api.calls) == 0


def test_unknown_keys_in_a_spec_file_are_usage_errors(api, tmp_path: Path) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"kind": "echo", "spec": {}, "priorty": 1}))
    result = invoke("submit", "-f", str(spec))
    assert result.exit_code == ExitCode.USAGE
    assert "priorty" in result.output


def test_invalid_spec_errors_are_printed_field_by_field(api) -> None:
    problem = {
        "status": 422, "code": "invalid_spec", "detail": "spec.epochs: too small",
        "errors": [{"loc": ["spec", "epochs"], "msg": "Input should be greater than 0"}],
    }  # fmt: skip
    api.post(f"{URL}/api/v1/jobs", json=problem, status=422)
    result = invoke("submit", "train", "--epochs", "0")
    assert result.exit_code == ExitCode.API_ERROR
    assert "spec.epochs: Input should be greater than 0" in result.stderr
    assert result.stdout == ""  # `id=$(kiln submit …)` gets nothing, not the errors


def test_a_lone_error_the_summary_already_names_is_printed_once(api) -> None:
    line = "spec.epochs: Input should be greater than 0"
    error = {"loc": ["spec", "epochs"], "msg": "Input should be greater than 0"}
    problem = {"status": 422, "code": "invalid_spec", "detail": line, "errors": [error]}
    api.post(f"{URL}/api/v1/jobs", json=problem, status=422)
    result = invoke("submit", "train", "--epochs", "0")
    assert result.stderr.count(line) == 1


def test_a_non_finite_number_is_a_usage_error_not_a_traceback(api) -> None:
    result = invoke("submit", "train", "--model-name", "x", "--lr", "NaN")
    assert result.exit_code == ExitCode.USAGE
    assert "JSON has no NaN or infinity" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(api.calls) == 0  # nothing was sent


def test_an_idempotency_key_travels_as_the_header(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    result = CliRunner().invoke(
        main,
        ["submit", "echo", "--idempotency-key", "nightly-2026-11-23"],
        env={"KILN_URL": URL, "KILN_API_KEY": "k"},
    )
    assert result.exit_code == 0, result.output
    assert api.calls[0].request.headers["Idempotency-Key"] == "nightly-2026-11-23"


def test_download_errors_fetches_the_error_file(api, tmp_path: Path) -> None:
    api.get(f"{URL}/api/v1/jobs/j/errors", body=b'{"row": 7, "reason": "NaN"}\n')
    result = CliRunner().invoke(
        main,
        ["download", "j", "--errors", "-o", str(tmp_path / "bad.jsonl")],
        env={"KILN_URL": URL, "KILN_API_KEY": "k"},
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bad.jsonl").read_bytes() == b'{"row": 7, "reason": "NaN"}\n'


def _wait_on(api: responses.RequestsMock, *readings: dict, metrics: dict | None = None) -> None:
    """The job answers each reading in turn; every metrics call answers `metrics`."""
    for reading in readings:
        api.get(f"{URL}/api/v1/jobs/{JOB['id']}", json={**JOB, **reading})
    series = metrics or {}
    api.get(f"{URL}/api/v1/jobs/{JOB['id']}/metrics", json={"series": series})


LONG_METRICS = {
    name: [{"step": 3, "value": 0.123456}]
    for name in ("train_loss", "train_loss_step", "val_accuracy", "val_f1", "val_loss")
}


@pytest.mark.parametrize("columns", ["80", "120"])
def test_the_wait_bar_keeps_its_percentage_at_narrow_widths(api, columns: str) -> None:
    """Long metrics once cut the bar and percentage away below ~200 columns."""
    _wait_on(
        api,
        {"state": "running", "progress": 0.4, "message": "epoch 8/20, ETA 1m 12s"},
        {"state": "cancelled", "progress": 0.4, "message": "cancelled while running"},
        metrics=LONG_METRICS,
    )
    result = CliRunner().invoke(
        main,
        ["wait", JOB["id"], "--interval", "0"],
        env={"KILN_URL": URL, "KILN_API_KEY": "k", "COLUMNS": columns},
    )
    assert result.exit_code == ExitCode.JOB_NOT_SUCCEEDED
    drawn = [line for line in result.stderr.splitlines() if line.startswith(JOB["id"][:12])]
    assert drawn, result.stderr
    assert "40%" in drawn[-1]
    assert "━" in drawn[-1]  # the bar itself
    assert all(len(line) <= int(columns) for line in drawn)


def test_the_wait_line_at_80_columns_shows_the_headline_metrics_first(api) -> None:
    """Alphabetical order after the message once cut val_accuracy away at 80 columns."""
    metrics = {**LONG_METRICS, "a_rate": [{"step": 3, "value": 5.0}]}
    metrics["val_accuracy"] = [{"step": 3, "value": 0.9375}]
    _wait_on(
        api,
        {"state": "running", "progress": 0.4, "message": "epoch 8/20, ETA 1m 12s"},
        {"state": "cancelled", "progress": 0.4, "message": "cancelled while running"},
        metrics=metrics,
    )
    result = CliRunner().invoke(
        main,
        ["wait", JOB["id"], "--interval", "0"],
        env={"KILN_URL": URL, "KILN_API_KEY": "k", "COLUMNS": "80"},
    )
    drawn = [line for line in result.stderr.splitlines() if line.startswith(JOB["id"][:12])]
    assert drawn, result.stderr
    assert "cancelled val_accuracy=0.9375 val_loss=" in drawn[-1]
    assert all(len(line) <= 80 for line in drawn)


def test_the_wait_metrics_put_the_headline_ones_first_then_the_rest_by_name() -> None:
    from kiln.client_progress import latest_metrics

    point = [{"step": 1, "value": 0.5}]
    names = ["zeta", "train_loss_step", "train_loss", "val_loss", "val_accuracy", "alpha"]
    line = latest_metrics({name: point for name in names} | {"empty": []})

    order = [part.split("=")[0] for part in line.split()]
    assert order == ["val_accuracy", "val_loss", "train_loss", "alpha", "train_loss_step", "zeta"]


def test_wait_says_the_state_once(api) -> None:
    _wait_on(api, {"state": "succeeded", "progress": 1.0, "message": "succeeded", "result": {}})
    result = invoke("wait", JOB["id"], "--interval", "0")
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.stderr
    assert "succeeded succeeded" not in result.stderr + result.stdout


def test_status_says_the_state_once(api) -> None:
    done = {**JOB, "state": "succeeded", "progress": 1.0, "message": "succeeded"}
    api.get(f"{URL}/api/v1/jobs/{JOB['id']}", json=done)
    result = invoke("status", JOB["id"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{JOB['id']}  train  succeeded  100%\n"


def test_submit_wait_prints_only_the_id_on_stdout(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    _wait_on(
        api,
        {"state": "running", "progress": 0.5, "message": "running"},
        {"state": "succeeded", "progress": 1.0, "message": "succeeded", "result": {"n": 1}},
    )
    result = invoke("submit", "echo", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout == JOB["id"] + "\n"
    assert f"{JOB['id']} succeeded" in result.stderr
    assert '{"n": 1}' in result.stderr


def test_submit_wait_exits_by_the_jobs_state(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    error = {"type": "JobFailure", "message": "deliberately broken"}
    _wait_on(api, {"state": "failed", "progress": 0.0, "message": "failed", "error": error})
    result = invoke("submit", "echo", "--wait")
    assert result.exit_code == ExitCode.JOB_NOT_SUCCEEDED
    assert result.stdout == JOB["id"] + "\n"
    assert "deliberately broken" in result.stderr


def test_json_submit_wait_prints_one_document(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    _wait_on(api, {"state": "succeeded", "progress": 1.0, "message": "succeeded", "result": {}})
    result = invoke("--json", "submit", "echo", "--wait")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "succeeded"


def test_a_refused_download_draws_no_bar(api, tmp_path: Path) -> None:
    problem = {"status": 404, "code": "not_found", "detail": "job j has no error file"}
    api.get(f"{URL}/api/v1/jobs/j/errors", json=problem, status=404)
    result = invoke("download", "j", "--errors", "-o", str(tmp_path))
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr == "error: 404 not_found: job j has no error file\n"
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--api-key", "--url"])
def test_a_client_option_after_submit_is_refused_not_sent_in_the_spec(api, flag: str) -> None:
    result = invoke("submit", "echo", flag, "SEKRIT123")
    assert result.exit_code == ExitCode.USAGE
    assert "belongs before the command" in result.output
    assert len(api.calls) == 0  # the key never left the machine


# --- job handles and the shared calls ----------------------------------------------------


def test_submit_returns_a_job_handle_that_is_still_the_apis_dict(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    job = Client(URL, "k").submit("echo", {"message": "x"})
    assert isinstance(job, dict)
    assert job == JOB
    assert job.id == JOB["id"]
    assert json.loads(json.dumps(job)) == JOB


@pytest.mark.parametrize(
    ("final", "raised"),
    [
        (
            {"state": "failed", "error": {"type": "JobFailure", "message": "no such column"}},
            kiln.JobFailed,
        ),
        ({"state": "cancelled", "message": "cancelled while running"}, kiln.JobCancelled),
    ],
)
def test_a_handles_wait_raises_the_typed_error_of_how_the_job_ended(
    api, final: dict, raised: type[Exception]
) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    for reading in ({"state": "running", "progress": 0.5}, final):
        api.get(f"{URL}/api/v1/jobs/{JOB['id']}", json={**JOB, **reading})
    job = Client(URL, "k").submit("train", {})
    with pytest.raises(raised) as caught:
        job.wait(progress=False, poll_s=0)
    assert caught.value.job["state"] == final["state"]
    assert job["state"] == final["state"]  # the handle holds the final reading
    if raised is kiln.JobFailed:
        assert (caught.value.error_type, caught.value.reason) == ("JobFailure", "no such column")


def test_a_handles_wait_gives_up_after_its_timeout(api) -> None:
    api.post(f"{URL}/api/v1/jobs", json=JOB, status=202)
    api.get(f"{URL}/api/v1/jobs/{JOB['id']}", json={**JOB, "state": "running"})
    with pytest.raises(kiln.WaitTimeout):
        Client(URL, "k").submit("train", {}).wait(progress=False, poll_s=0, timeout_s=0)


def test_schedule_methods_call_the_schedule_routes(api) -> None:
    schedule = {"id": "s1", "name": "n", "cron": "0 2 * * *", "kind": "echo", "enabled": True}
    create = api.post(f"{URL}/api/v1/schedules", json=schedule, status=201)
    api.get(f"{URL}/api/v1/schedules", json={"schedules": [schedule]})
    api.post(f"{URL}/api/v1/schedules/s1/pause", json={**schedule, "enabled": False})
    api.delete(f"{URL}/api/v1/schedules/s1", status=204)
    client = Client(URL, "k")
    client.create_schedule("n", "0 2 * * *", "echo", {"message": "m"}, priority=4, enabled=False)
    assert json.loads(create.calls[0].request.body) == {
        "name": "n", "cron": "0 2 * * *", "kind": "echo", "spec": {"message": "m"},
        "priority": 4, "enabled": False,
    }  # fmt: skip
    assert client.schedules() == [schedule]
    assert client.pause_schedule("s1")["enabled"] is False
    assert client.delete_schedule("s1") is None


def test_the_async_client_maps_errors_as_the_sync_one() -> None:
    """One mapping (kiln.client_core.api_error) for both transports."""
    import asyncio

    import httpx

    from kiln import AsyncClient

    answers = {
        "/api/v1/jobs/gone": (404, {"code": "not_found", "detail": "no such job"}),
        "/api/v1/keys": (403, {"code": "forbidden", "detail": "admin only"}),
        "/api/v1/jobs/odd": (502, None),
    }

    def reply(request: httpx.Request) -> httpx.Response:
        status, body = answers[request.url.path]
        return httpx.Response(status, json=body) if body else httpx.Response(status, text="<html>")

    async def errors() -> list[tuple[type, int, str]]:
        http = httpx.AsyncClient(transport=httpx.MockTransport(reply))
        async with AsyncClient(URL, "k", http=http) as client:
            seen = []
            for call in (client.job("gone"), client.keys(), client.job("odd")):
                try:
                    await call
                except ApiError as exc:
                    seen.append((type(exc), exc.status, exc.code))
            return seen

    assert asyncio.run(errors()) == [
        (NotFoundError, 404, "not_found"),
        (AuthError, 403, "forbidden"),
        (ApiError, 502, "http_502"),
    ]


def test_a_non_finite_number_is_refused_by_the_async_client_too() -> None:
    import asyncio

    from kiln import AsyncClient
    from kiln.client import InvalidInput

    async def submit() -> None:
        async with AsyncClient(URL, "k") as client:
            await client.submit("train", {"lr": float("nan")})

    with pytest.raises(InvalidInput):
        asyncio.run(submit())


def test_download_to_a_missing_folder_with_a_trailing_slash_creates_it(
    api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kiln download ID -o out/`, as the docs write it: a folder, not a file named out."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        api.get(
            f"{URL}/api/v1/jobs/j/output",
            body=b"a,b\n1,2\n",
            headers={"Content-Disposition": 'attachment; filename="predictions.csv"'},
        )

    into_folder = invoke("download", "j", "-o", "out/")
    as_file = invoke("download", "j", "-o", "plain.csv")

    assert into_folder.exit_code == ExitCode.OK, into_folder.output
    assert (tmp_path / "out").is_dir()
    assert (tmp_path / "out" / "predictions.csv").read_bytes() == b"a,b\n1,2\n"
    assert as_file.exit_code == ExitCode.OK, as_file.output
    assert (tmp_path / "plain.csv").read_bytes() == b"a,b\n1,2\n"
