"""Webhooks end to end: jobs through the real API, a real worker process, the real
`kiln deliver` process, and a real HTTP receiver on 127.0.0.1 that checks signatures with
the `standardwebhooks` package; on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from db import webhooks as outbox
from kiln.settings import Settings
from tests.integration.conftest import REPO_ROOT, Api, Worker, clean_env
from tests.webhook_receiver import Received, Receiver
from web import create_app

pytestmark = pytest.mark.integration

#: Bounds on a loaded 2-core machine, not timings.
DELIVERED_S = 90.0


class Deliverer:
    """`python -m kiln.cli deliver` in a session of its own."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.env = clean_env(
            data_dir=str(settings.data_dir),
            database_url=settings.resolved_database_url,
            redis_url=settings.redis_url,
            webhook_allow_private="1",
            webhook_timeout_s="5",
            webhook_lease_s="6",
            webhook_retry_base_s="0.2",
            webhook_retry_max_s="1",
            webhook_poll_s="0.1",
        )
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiln.cli", "deliver"],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a lost machine would."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def deliverer(live_settings: Settings, tmp_path: Path) -> Iterator[Deliverer]:
    running = Deliverer(live_settings, tmp_path / "deliver.log")
    running.start()
    yield running
    running.kill()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def hooks_api(live_settings: Settings, create_key: Callable[..., str]) -> Iterator[Api]:
    """The API as alice, on an app that lets webhooks go to 127.0.0.1 (the receiver)."""
    app = create_app(live_settings.model_copy(update={"webhook_allow_private": True}))
    app.config["TESTING"] = True
    yield Api(app.test_client(), create_key("alice"))
    app.extensions["kiln.engine"].dispose()
    app.extensions["kiln.celery"].close()


def _submit(api: Api, receiver: Receiver, events: list[str], **spec: Any) -> dict[str, Any]:
    body = {"kind": "echo", "spec": spec, "webhook_url": receiver.url, "webhook_events": events}
    response = api.client.post("/api/v1/jobs", json=body, headers=api.headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()  # type: ignore[no-any-return]


def _events(received: list[Received], secret: str, job_id: str) -> list[str]:
    """The events of `job_id` that arrived with a valid signature."""
    bodies = [r.verified([secret]) for r in received]
    return [b["type"] for b in bodies if b is not None and b["data"]["id"] == job_id]


def _delivered(api: Api, job_id: str, wait_until: Callable[..., Any]) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        messages = api.get(f"/jobs/{job_id}/deliveries")["messages"]
        return messages if messages and all(m["state"] == "delivered" for m in messages) else None

    return wait_until(done, f"every message of {job_id} delivered", DELIVERED_S)  # type: ignore[no-any-return]


def test_a_finished_job_reaches_the_receiver_signed(
    hooks_api: Api,
    worker: Worker,
    deliverer: Deliverer,
    receiver: Receiver,
    wait_until: Callable[..., Any],
) -> None:
    secret = hooks_api.get("/webhooks/secret")["secret"]
    job = _submit(hooks_api, receiver, ["running", "succeeded"], message="hi")
    hooks_api.wait_for(job["id"], "succeeded")
    messages = _delivered(hooks_api, job["id"], wait_until)
    assert [m["event"] for m in messages] == ["running", "succeeded"]
    received = receiver.snapshot()
    assert sorted(_events(received, secret, job["id"])) == ["job.running", "job.succeeded"]
    assert {r.webhook_id for r in received} == {m["id"] for m in messages}
    assert all(m["deliveries"][-1]["status_code"] == 200 for m in messages), deliverer.log()


def test_a_receiver_answering_500_then_200_gets_it_on_the_second_attempt(
    hooks_api: Api, deliverer: Deliverer, receiver: Receiver, wait_until: Callable[..., Any]
) -> None:
    receiver.script = lambda request, earlier: 500 if earlier == 0 else 200
    secret = hooks_api.get("/webhooks/secret")["secret"]
    job = _submit(hooks_api, receiver, ["cancelled"])
    hooks_api.cancel(job["id"])  # queued: cancelled at once, no worker needed
    (message,) = _delivered(hooks_api, job["id"], wait_until)
    assert [(d["number"], d["status_code"]) for d in message["deliveries"]] == [
        (1, 500),
        (2, 200),
    ]
    assert [d["outcome"] for d in message["deliveries"]] == ["failed", "delivered"]
    first, second = receiver.snapshot()
    assert first.webhook_id == second.webhook_id == message["id"]
    assert _events([first, second], secret, job["id"]) == ["job.cancelled", "job.cancelled"]


def test_a_delivery_process_killed_mid_delivery_leaves_the_message_to_its_successor(
    hooks_api: Api,
    live_settings: Settings,
    tmp_path: Path,
    receiver: Receiver,
    wait_until: Callable[..., Any],
) -> None:
    """The deliverer is SIGKILLed while the receiver holds its first request: no answer is
    recorded, the lease runs out, and the restarted deliverer sends the same message (same
    webhook-id) again. At least once, never lost."""
    deliverer = Deliverer(live_settings, tmp_path / "deliver.log")

    def kill_mid_delivery(request: Received, earlier: int) -> int:
        if earlier == 0:
            deliverer.kill()  # before it hears the answer
        return 200

    receiver.script = kill_mid_delivery
    secret = hooks_api.get("/webhooks/secret")["secret"]
    job = _submit(hooks_api, receiver, ["cancelled"])
    hooks_api.cancel(job["id"])
    deliverer.start()
    try:
        wait_until(lambda: receiver.snapshot(), "the first delivery attempt", DELIVERED_S)
        wait_until(
            lambda: deliverer.process is not None and deliverer.process.poll() is not None,
            "the deliverer to be killed",
        )
        deliverer.start()  # a fresh process (a supervisor's restart)
        (message,) = _delivered(hooks_api, job["id"], wait_until)
    finally:
        deliverer.kill()
    first, *again = receiver.snapshot()
    assert again, "the message was sent only once"
    assert {r.webhook_id for r in [first, *again]} == {message["id"]}
    assert set(_events([first, *again], secret, job["id"])) == {"job.cancelled"}
    attempts = message["deliveries"]
    assert attempts[0]["number"] == 1
    assert attempts[0]["error"] == outbox.LOST_ATTEMPT
    assert attempts[-1]["status_code"] == 200
