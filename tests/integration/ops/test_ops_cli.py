"""The `kiln` client commands against a real server, a real broker and a real worker launcher;
and what that worker shows operators: Prometheus metrics, JSON logs, `celery inspect ping`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result
from ops_support import (
    ROOT,
    LiveServer,
    Worker,
    free_port,
    launcher_argv,
    make_key,
    wait_until,
    worker_env,
)

from kiln.cli import main
from kiln.client_cli import ExitCode
from kiln.settings import Settings

pytestmark = pytest.mark.integration

DIGITS_ROW = [0, 0, 5, 13, 9, 1, 0, 0] * 8


@pytest.fixture(scope="module")
def server(
    pg_url: str, broker_url: str, serve: Callable[[Settings], LiveServer], tmp_path_factory
) -> LiveServer:
    data_dir = tmp_path_factory.mktemp("web")
    return serve(Settings(data_dir=data_dir, database_url=pg_url, redis_url=broker_url))


@pytest.fixture(scope="module")
def worker(server: LiveServer, start_worker: Callable[..., Worker]) -> Worker:
    """`kiln worker` on the server's host (same data directory): one CPU worker, metrics on
    a free port."""
    env = worker_env(
        server.settings, KILN_GPUS="none", KILN_CPU_WORKERS="1", KILN_METRICS_PORT=str(free_port())
    )
    return start_worker(launcher_argv(), env)


@pytest.fixture(scope="module")
def admin_key(server: LiveServer) -> str:
    return make_key(server.settings.database_url, "root", "admin")


@pytest.fixture(scope="module")
def user_key(server: LiveServer) -> str:
    return make_key(server.settings.database_url, "carol")


@pytest.fixture
def kiln(server: LiveServer, user_key: str) -> Callable[..., Result]:
    """kiln(*args, key=...) -> the CliRunner result of `kiln args` against the live server."""

    def invoke(*args: str, key: str | None = None, url: str | None = None) -> Result:
        env = {"KILN_URL": url or server.url, "KILN_API_KEY": key or user_key}
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    return invoke


def test_train_wait_logs_and_predict_from_a_spec_file(
    kiln: Callable[..., Result], worker: Worker, tmp_path: Path
) -> None:
    submitted = kiln("submit", "train", "--model-name", "cli-digits", "--epochs", "2")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32

    waited = kiln("wait", job_id, "--timeout", "240", "--interval", "0.5")
    assert waited.exit_code == ExitCode.OK, waited.output + worker.output()[-3000:]
    assert f"{job_id} succeeded" in waited.stdout
    assert json.loads(waited.stdout.splitlines()[-1])["model"] == "cli-digits"

    status = kiln("--json", "status", job_id)
    assert json.loads(status.stdout)["state"] == "succeeded"
    logs = kiln("logs", job_id)
    assert "epoch 2:" in logs.stdout
    followed = kiln("logs", "--follow", job_id)  # ends by itself: the job has finished
    assert followed.stdout == logs.stdout

    listed = kiln("models", "list")
    assert "cli-digits  1 versions" in listed.stdout
    version = json.loads(kiln("models", "show", "cli-digits", "--version", "latest").stdout)
    assert version["number"] == 1
    assert version["source_job_id"] == job_id

    spec = tmp_path / "predict.yaml"
    spec.write_text(
        f"kind: predict\nspec:\n  model: cli-digits\n  inputs:\n    - {json.dumps(DIGITS_ROW)}\n"
    )
    predicted = kiln("submit", "-f", str(spec), "--wait")
    assert predicted.exit_code == ExitCode.OK, predicted.output
    assert predicted.stdout.split() == [predicted.stdout.strip()]  # the id alone
    result = json.loads(predicted.stderr.splitlines()[-1])
    assert result["version"] == 1
    assert result["predictions"][0]["label"] in {str(d) for d in range(10)}


def test_wait_exits_1_for_a_failed_job_and_names_the_error(
    kiln: Callable[..., Result], worker: Worker
) -> None:
    job_id = kiln("submit", "echo", "--fail-with", "deliberately broken").stdout.strip()
    waited = kiln("wait", job_id, "--timeout", "240", "--interval", "0.5")
    assert waited.exit_code == ExitCode.JOB_NOT_SUCCEEDED
    assert f"{job_id} failed" in waited.stdout
    assert "deliberately broken" in waited.stderr


def test_cancel_stops_a_running_job_and_wait_exits_1(
    kiln: Callable[..., Result], worker: Worker
) -> None:
    job_id = kiln("submit", "echo", "--sleep-s", "120").stdout.strip()
    wait_until(
        lambda: json.loads(kiln("--json", "status", job_id).stdout)["state"] == "running",
        240,
        "the echo job to start",
    )
    cancelled = kiln("cancel", job_id)
    assert cancelled.exit_code == 0
    assert "running (stopping)" in cancelled.stdout
    waited = kiln("wait", job_id, "--timeout", "60", "--interval", "0.2")
    assert waited.exit_code == ExitCode.JOB_NOT_SUCCEEDED
    assert f"{job_id} cancelled" in waited.stdout


def test_a_worker_killed_mid_job_is_restarted_and_its_new_pool_process_requeues_the_job(
    kiln: Callable[..., Result], admin_key: str, worker: Worker
) -> None:
    """No scheduler runs here, so no reconciler: the launcher restarts the SIGKILLed worker
    under its name, Celery's pool process died with it, and the new pool process re-queues
    the job the database still shows running there."""
    job_id = kiln("submit", "echo", "--sleep-s", "3").stdout.strip()

    def running_on() -> str | None:
        job = json.loads(kiln("--json", "status", job_id).stdout)
        return job["worker"] if job["state"] == "running" else None

    name = wait_until(running_on, 240, "the echo job to start")
    [process] = [w for w in json.loads(kiln("--json", "workers", key=admin_key).stdout)
                 if w["name"] == name]  # fmt: skip
    os.kill(process["pid"], signal.SIGKILL)

    waited = kiln("wait", job_id, "--timeout", "180", "--interval", "0.5")
    assert waited.exit_code == 0, waited.output
    done = json.loads(kiln("--json", "status", job_id).stdout)
    assert (done["attempt"], done["worker"]) == (2, name)  # the restarted worker ran it again
    assert f"worker {name} lost the process running it (attempt 1)" in kiln("logs", job_id).stdout


def test_uploaded_dataset_trains_a_model(
    kiln: Callable[..., Result], worker: Worker, tmp_path: Path
) -> None:
    csv = tmp_path / "xor.csv"
    rows = [f"{a},{b},{a ^ b}" for a in (0, 1) for b in (0, 1)] * 20
    csv.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    uploaded = kiln("datasets", "upload", str(csv), "--name", "xor")
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.stdout.strip()
    assert "xor: 80 rows, 3 columns" in uploaded.stderr
    assert dataset_id in kiln("datasets", "list").stdout

    trained = kiln(
        "submit", "train", "--model-name", "xor", "--dataset", dataset_id, "--epochs", "2",
        "--arch-params.hidden", "[8]", "--wait",
    )  # fmt: skip
    assert trained.exit_code == ExitCode.OK, trained.output
    assert json.loads(trained.stderr.splitlines()[-1])["model"] == "xor"


def test_exit_codes_tell_scripts_what_went_wrong(
    kiln: Callable[..., Result], server: LiveServer
) -> None:
    assert kiln("status", "0" * 32).exit_code == ExitCode.NOT_FOUND
    assert kiln("status", "0" * 32, key="not-a-key").exit_code == ExitCode.AUTH
    assert kiln("keys", "list").exit_code == ExitCode.AUTH  # a user key is not an admin key

    invalid = kiln("submit", "train", "--epochs", "0")
    assert invalid.exit_code == ExitCode.API_ERROR
    assert "invalid_spec" in invalid.stderr
    assert "spec.epochs" in invalid.stdout + invalid.stderr

    assert kiln("submit").exit_code == ExitCode.USAGE
    assert kiln("submit", "echo", "--message").exit_code == ExitCode.USAGE

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{unused.getsockname()[1]}"
        assert kiln("status", "x", url=nowhere).exit_code == ExitCode.UNREACHABLE

    # Nothing serves the gpu queue here, so the job stays queued past the timeout.
    job_id = kiln("submit", "echo", "--device", "gpu").stdout.strip()
    timed_out = kiln("wait", job_id, "--timeout", "1", "--interval", "0.2")
    assert timed_out.exit_code == ExitCode.TIMEOUT
    assert kiln("cancel", job_id).exit_code == 0


def test_keys_go_through_the_api_when_a_server_is_named(
    kiln: Callable[..., Result], admin_key: str, user_key: str
) -> None:
    created = kiln("keys", "create", "--owner", "dave", key=admin_key)
    assert created.exit_code == 0, created.output
    new_key = created.stdout.strip()
    key_id = created.stderr.split()[0].removeprefix("id=")
    assert kiln("jobs", key=new_key).exit_code == 0  # the new key works

    listed = json.loads(kiln("--json", "keys", "list", key=admin_key).stdout)
    assert {k["id"] for k in listed if k["owner"] == "dave"} == {key_id}
    assert kiln("keys", "revoke", key_id, key=admin_key).exit_code == 0
    assert kiln("jobs", key=new_key).exit_code == ExitCode.AUTH


def test_keys_write_the_database_when_no_server_is_named(server: LiveServer) -> None:
    env = {"KILN_URL": "", "KILN_DATABASE_URL": server.settings.database_url}
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "--owner", "erin"], env=env)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    answer = requests.get(
        f"{server.url}/api/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert answer.status_code == 200
    listed = runner.invoke(main, ["keys", "list"], env=env)
    assert "erin" in listed.stdout
    as_json = runner.invoke(main, ["--json", "keys", "create", "--owner", "fay"], env=env)
    assert as_json.exit_code == 0, as_json.output
    created_json = json.loads(as_json.stdout)
    assert (created_json["owner"], created_json["role"]) == ("fay", "user")
    works = requests.get(
        f"{server.url}/api/v1/jobs",
        headers={"Authorization": f"Bearer {created_json['key']}"},
        timeout=10,
    )
    assert works.status_code == 200


def test_download_of_a_job_without_output_is_not_found(
    kiln: Callable[..., Result], server: LiveServer, worker: Worker, tmp_path: Path
) -> None:
    if not server.has_route("GET", "/jobs/<job_id>/output"):
        pytest.skip("this build has no GET /api/v1/jobs/<id>/output route yet")
    job_id = kiln("submit", "echo", "--wait").stdout.strip()
    answer = kiln("download", job_id, "-o", str(tmp_path))
    assert answer.exit_code == ExitCode.NOT_FOUND
    assert list(tmp_path.iterdir()) == []


def test_alias_set_points_the_alias_at_a_version(
    kiln: Callable[..., Result], server: LiveServer, worker: Worker
) -> None:
    if not server.has_route("PUT", "/aliases/<alias>"):
        pytest.skip("this build has no PUT /api/v1/models/<name>/aliases/<alias> route yet")
    kiln("submit", "train", "--model-name", "aliased", "--epochs", "1", "--wait")
    assert kiln("models", "alias", "aliased", "production", "1").exit_code == 0
    model = json.loads(kiln("models", "show", "aliased").stdout)
    assert model["aliases"] == {"production": 1}
    assert kiln("models", "delete", "aliased").exit_code != 0  # refused while aliased
    assert kiln("models", "unalias", "aliased", "production").exit_code == 0
    assert json.loads(kiln("models", "show", "aliased").stdout)["aliases"] == {}
    assert kiln("models", "delete", "aliased").exit_code == 0


def test_worker_metrics_count_the_jobs_it_finished(
    kiln: Callable[..., Result], worker: Worker
) -> None:
    # (A predict of a model that does not exist is refused at submit now, so no job fails.)
    job_id = kiln("submit", "echo", "--fail-with", "deliberately broken").stdout
    assert kiln("wait", job_id.strip(), "--timeout", "240").exit_code == 1
    port = worker.env["KILN_METRICS_PORT"]
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    failed = [
        line
        for line in body.splitlines()
        if line.startswith("kiln_worker_jobs_total{")
        and 'kind="echo"' in line
        and 'state="failed"' in line
        and 'worker="cpu0-i0@' in line  # echo runs in the interactive lane
    ]
    assert failed, body
    assert float(failed[0].split()[-1]) >= 1
    assert 'kiln_job_duration_seconds_count{kind="echo",state="failed"}' in body


def test_worker_log_lines_are_json_tagged_with_the_job(
    kiln: Callable[..., Result], worker: Worker
) -> None:
    job_id = kiln("submit", "echo", "--message", "tagged", "--wait").stdout.split()[0]
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    tagged = [line for line in lines if line.get("job_id") == job_id]
    assert tagged, worker.output()[-3000:]
    assert all(line["kind"] == "echo" and line["attempt"] == 1 for line in tagged)
    # echo runs in the interactive lane: the CPU's first interactive worker
    assert all(line["worker"].startswith("cpu0-i0@") and line["device"] == "cpu" for line in tagged)
    assert any("event=succeeded" in line["msg"] for line in tagged)


def test_celery_inspect_ping_lists_the_named_worker(worker: Worker) -> None:
    def ping() -> str:
        answer = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "workers.main", "inspect", "ping",
             "--timeout", "3"],
            env=worker.env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return answer.stdout if "cpu0@" in answer.stdout else ""

    out = wait_until(ping, 120, "the worker to answer celery inspect ping")
    assert f"cpu0@{socket.gethostname()}: OK" in out
    assert "pong" in out


def test_flower_shows_the_worker_by_name_behind_basic_auth(
    worker: Worker, start_worker: Callable[..., Worker]
) -> None:
    """The way docs/deploy-ops.md and the Procfile run Flower: basic auth from
    FLOWER_BASIC_AUTH; its API answers with the credentials and 401 without them."""
    pytest.importorskip("flower", reason="Flower is in the ops extra")
    port = free_port()
    argv = [sys.executable, "-m", "celery", "-A", "workers.main", "flower", f"--port={port}",
            "--address=127.0.0.1"]  # fmt: skip
    flower = start_worker(argv, {**worker.env, "FLOWER_BASIC_AUTH": "ops:flower-test-password"})
    url = f"http://127.0.0.1:{port}/api/workers?refresh=1"

    def workers() -> dict:
        try:
            answer = requests.get(url, auth=("ops", "flower-test-password"), timeout=15)
        except requests.ConnectionError:
            return {}
        return answer.json() if answer.status_code == 200 else {}

    found = wait_until(workers, 120, "Flower to list the worker")
    assert f"cpu0@{socket.gethostname()}" in found, flower.output()[-2000:]
    assert requests.get(url, timeout=15).status_code == 401
    assert requests.get(url, auth=("ops", "wrong"), timeout=15).status_code == 401
