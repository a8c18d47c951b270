"""kiln.Client's job handles, kiln.AsyncClient, `kiln schedules` and `kiln workers` against
a real server, a real broker and a real worker launcher (`kiln worker`)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner, Result
from ops_support import (
    LiveServer,
    Worker,
    free_port,
    launcher_argv,
    make_key,
    wait_until,
    worker_env,
)

from kiln import AsyncClient, JobCancelled, JobFailed
from kiln.cli import main
from kiln.client import ApiError, Client, Job, NotFoundError
from kiln.client_cli import ExitCode
from kiln.settings import Settings
from workers.launch import WorkerProcess

pytestmark = pytest.mark.integration

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def server(
    pg_url: str, broker_url: str, serve: Callable[[Settings], LiveServer], tmp_path_factory
) -> LiveServer:
    data_dir = tmp_path_factory.mktemp("web")
    return serve(Settings(data_dir=data_dir, database_url=pg_url, redis_url=broker_url))


@pytest.fixture(scope="module")
def worker(server: LiveServer, start_worker: Callable[..., Worker]) -> Worker:
    """`kiln worker`: one CPU device, so a bulk worker cpu0 and an interactive one cpu0-i0."""
    env = worker_env(server.settings, KILN_GPUS="none", KILN_CPU_WORKERS="1", KILN_METRICS_PORT="0")
    return start_worker(launcher_argv(), env)


@pytest.fixture(scope="module")
def admin_key(server: LiveServer) -> str:
    return make_key(server.settings.database_url, "root", "admin")


@pytest.fixture(scope="module")
def user_key(server: LiveServer) -> str:
    return make_key(server.settings.database_url, "dora")


@pytest.fixture
def client(server: LiveServer, user_key: str) -> Client:
    return Client(server.url, user_key)


@pytest.fixture
def kiln(server: LiveServer, user_key: str) -> Callable[..., Result]:
    def invoke(*args: str, key: str | None = None) -> Result:
        env = {"KILN_URL": server.url, "KILN_API_KEY": key or user_key}
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    return invoke


def _live_workers(server: LiveServer, admin_key: str) -> list[dict]:
    return Client(server.url, admin_key).workers()


# --- job handles: submit(...).wait() --------------------------------------------------------


def test_submit_returns_the_job_as_before_and_wait_returns_it_succeeded(
    client: Client, worker: Worker
) -> None:
    job = client.submit("echo", {"message": "handle"})
    assert isinstance(job, dict)
    assert isinstance(job, Job)
    assert json.loads(json.dumps(job))["id"] == job.id  # still the API's JSON
    assert job["state"] == "queued"

    finished = job.wait(progress=False, poll_s=0.2)

    assert finished is job
    assert (job["state"], job["result"]) == ("succeeded", {"message": "handle"})


def test_a_failed_job_raises_job_failed_with_its_reason(client: Client, worker: Worker) -> None:
    job = client.submit("echo", {"fail_with": "the disk is full"})
    with pytest.raises(JobFailed) as raised:
        job.wait(progress=False, poll_s=0.2)
    assert "the disk is full" in raised.value.reason
    assert raised.value.job["state"] == "failed"
    assert job["state"] == "failed"


def test_a_cancelled_job_raises_job_cancelled(client: Client, worker: Worker) -> None:
    job = client.submit("echo", {"sleep_s": 60})
    wait_until(lambda: job.refresh()["state"] == "running", 60, "the echo job to run")
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(progress=False, poll_s=0.2)


def test_wait_draws_its_bar_on_stderr_when_asked(
    client: Client, worker: Worker, capsys: pytest.CaptureFixture[str]
) -> None:
    job = client.submit("echo", {"message": "bar"})
    job.wait(progress=True, poll_s=0.2)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert job.id[:12] in captured.err
    assert "100%" in captured.err


# --- AsyncClient ------------------------------------------------------------------------------


def test_the_async_client_answers_as_the_sync_one(
    server: LiveServer, user_key: str, client: Client, worker: Worker, tmp_path: Path
) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b\n1,2\n3,4\n")

    async def scenario() -> dict:
        async with AsyncClient(server.url, user_key) as kiln:
            job = await kiln.submit("echo", {"message": "async"}, priority=3)
            done = await job.wait(progress=False, poll_s=0.2)
            listed = [j["id"] async for j in kiln.jobs(kind="echo", limit=50)]
            events = await kiln.events(job.id)
            failing = await kiln.submit("echo", {"fail_with": "async boom"})
            try:
                await failing.wait(progress=False, poll_s=0.2)
                failed = None
            except JobFailed as exc:
                failed = exc.reason
            try:
                await kiln.job("no-such-job")
                missing = None
            except NotFoundError as exc:
                missing = (exc.status, exc.code)
            try:
                await kiln.submit("echo", {"sleep_s": "soon"})
                invalid = None
            except ApiError as exc:
                invalid = (exc.status, exc.code, [e["loc"] for e in exc.errors])
            progress: list[tuple[int, int | None]] = []
            uploaded = await kiln.upload_dataset(
                csv, name="async-rows", on_progress=lambda d, t: progress.append((d, t))
            )
            return {
                "done": dict(done),
                "listed": listed,
                "events": events,
                "failed": failed,
                "missing": missing,
                "invalid": invalid,
                "uploaded": uploaded,
                "progress": progress,
            }

    seen = asyncio.run(scenario())

    done = seen["done"]
    assert (done["state"], done["result"], done["priority"]) == (
        "succeeded",
        {"message": "async"},
        3,
    )
    assert done == client.job(done["id"])  # the same answer as the sync client's
    assert done["id"] in seen["listed"]
    assert seen["events"] == client.events(done["id"])
    assert "async boom" in seen["failed"]
    assert seen["missing"] == (404, "not_found")
    assert seen["invalid"][:2] == (422, "invalid_spec")
    assert ["spec", "sleep_s"] in seen["invalid"][2]
    assert (seen["uploaded"]["name"], seen["uploaded"]["rows"]) == ("async-rows", 2)
    assert seen["progress"][-1] == (csv.stat().st_size, csv.stat().st_size)


def test_the_async_client_reports_an_unreachable_server() -> None:
    from kiln.client import ConnectionFailed

    async def scenario() -> None:
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", "k", timeout_s=5) as kiln:
            await kiln.jobs().__anext__()

    with pytest.raises(ConnectionFailed):
        asyncio.run(scenario())


# --- kiln schedules -------------------------------------------------------------------------


def test_schedules_commands_create_list_pause_resume_show_and_delete(
    kiln: Callable[..., Result], client: Client
) -> None:
    created = kiln("schedules", "create", "nightly", "0 2 * * *", "echo", "--message", "hi")
    assert created.exit_code == 0, created.output
    schedule_id = created.stdout.strip()
    stored = client.schedule(schedule_id)
    # The stored spec is the validated one: the message given, defaults filled in.
    assert (stored["cron"], stored["kind"], stored["spec"]["message"]) == (
        "0 2 * * *",
        "echo",
        "hi",
    )
    assert stored["enabled"]
    assert "T02:00:00" in stored["next_run_at"]

    listed = kiln("schedules", "list")
    assert schedule_id in listed.stdout
    assert "nightly" in listed.stdout

    paused = kiln("schedules", "pause", schedule_id)
    assert paused.exit_code == 0
    assert "paused" in paused.stderr
    assert client.schedule(schedule_id)["enabled"] is False
    assert kiln("schedules", "resume", schedule_id).exit_code == 0
    assert client.schedule(schedule_id)["enabled"] is True

    shown = kiln("--json", "schedules", "show", schedule_id)
    assert json.loads(shown.stdout)["name"] == "nightly"

    assert kiln("schedules", "delete", schedule_id).exit_code == 0
    gone = kiln("schedules", "show", schedule_id)
    assert gone.exit_code == ExitCode.NOT_FOUND


def test_schedules_create_refuses_a_bad_cron_or_spec_by_field(kiln: Callable[..., Result]) -> None:
    bad_cron = kiln("schedules", "create", "x", "every night", "echo")
    assert bad_cron.exit_code == ExitCode.API_ERROR
    bad_spec = kiln("schedules", "create", "x", "0 2 * * *", "echo", "--sleep-s", '"soon"')
    assert bad_spec.exit_code == ExitCode.API_ERROR
    assert "sleep_s" in bad_spec.stderr
    usage = kiln("schedules", "create", "x", "0 2 * * *")
    assert usage.exit_code == ExitCode.USAGE


def test_schedules_create_paused_from_a_spec_file(
    kiln: Callable[..., Result], client: Client, tmp_path: Path
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("kind: echo\npriority: 7\nspec:\n  message: from a file\n")
    created = kiln(
        "--json", "schedules", "create", "filed", "*/5 * * * *", "-f", str(spec), "--paused"
    )
    body = json.loads(created.stdout)
    assert (body["priority"], body["spec"]["message"], body["enabled"]) == (7, "from a file", False)
    assert body["next_run_at"] is None
    client.delete_schedule(body["id"])


# --- kiln workers ---------------------------------------------------------------------------


def test_workers_lists_the_launchers_workers_with_their_queues(
    server: LiveServer, admin_key: str, worker: Worker
) -> None:
    found = wait_until(
        lambda: len(_live_workers(server, admin_key)) == 2 and _live_workers(server, admin_key),
        60,
        "both workers of the launcher to announce themselves",
    )
    by_name = {w["name"]: w for w in found}
    assert set(by_name) == {f"cpu0@{HOST}", f"cpu0-i0@{HOST}"}
    bulk, interactive = by_name[f"cpu0@{HOST}"], by_name[f"cpu0-i0@{HOST}"]
    assert (bulk["lane"], bulk["queues"], bulk["devices"]) == ("bulk", ["cpu"], ["cpu"])
    assert (interactive["lane"], interactive["queues"]) == ("interactive", ["interactive.cpu"])
    assert bulk["host"] == HOST
    assert bulk["concurrency"] == 1
    assert 0 <= bulk["heartbeat_age_s"] < 60


def test_workers_shows_the_job_a_worker_runs(
    server: LiveServer, admin_key: str, client: Client, kiln: Callable[..., Result], worker: Worker
) -> None:
    job = client.submit("echo", {"sleep_s": 60})
    wait_until(lambda: job.refresh()["state"] == "running", 60, "the echo job to run")
    try:
        running = {w["name"]: w for w in _live_workers(server, admin_key)}[job["worker"]]
        assert running["job"]["id"] == job.id
        assert running["job"]["kind"] == "echo"

        table = kiln("workers", key=admin_key)
        assert table.exit_code == 0, table.output
        assert table.stdout.splitlines()[0].split() == [
            "NAME", "DEVICES", "LANE", "JOB", "HEARTBEAT"
        ]  # fmt: skip
        line = next(row for row in table.stdout.splitlines() if row.startswith(job["worker"]))
        assert line.split()[1:4] == ["cpu", "interactive", job.id]
        assert all(len(row) <= 80 for row in table.stdout.splitlines())
    finally:
        client.cancel(job.id)


def test_workers_needs_an_admin_key(kiln: Callable[..., Result], server: LiveServer) -> None:
    assert kiln("workers").exit_code == ExitCode.AUTH
    response = requests.get(f"{server.url}/api/v1/workers", timeout=10)
    assert response.status_code == 401


def test_a_worker_that_shuts_down_leaves_the_list_at_once(
    server: LiveServer, admin_key: str, start_worker: Callable[..., Worker]
) -> None:
    """A Celery worker as the launcher starts one, stopped with SIGTERM (a warm shutdown,
    as systemd or the launcher stops it): its record goes with it, not a TTL later."""
    spec = WorkerProcess(name="leaving", queues=("cpu",), env={"CUDA_VISIBLE_DEVICES": ""})
    env = {**worker_env(server.settings), **spec.env}
    leaving = start_worker(spec.argv(), env)
    name = f"leaving@{HOST}"
    listed = wait_until(
        lambda: (
            {w["name"]: w for w in _live_workers(server, admin_key)}.get(name)
            or leaving.process.poll() is not None
        ),
        60,
        "the worker to announce itself",
    )
    assert leaving.process.poll() is None, leaving.output()
    assert listed["pid"] == leaving.process.pid

    leaving.process.send_signal(signal.SIGTERM)
    leaving.process.wait(timeout=60)

    assert name not in {w["name"] for w in _live_workers(server, admin_key)}
