"""Live job streams end to end: a job run by a real worker process, streamed by a real HTTP
server (werkzeug, threaded) to kiln.Client.follow, through a proxy that drops the first
connection mid-stream; and polling where the key is at its stream limit."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from kiln import Client
from kiln.cli import main
from kiln.settings import Settings
from web import create_app

_TRAIN = {
    "model_name": "streamed",
    "dataset": "builtin:iris",
    "epochs": 30,
    "batch_size": 16,
    "seed": 3,
    "device": "cpu",
}


@pytest.fixture
def server(live_settings: Settings) -> Iterator[str]:
    """The app on the test's settings, served over HTTP in this process; its URL."""
    app = create_app(live_settings.model_copy(update={"streams_per_key": 1}))
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    app.extensions["kiln.stream_hub"].stop()
    app.extensions["kiln.engine"].dispose()
    app.extensions["kiln.celery"].close()


class DroppingProxy:
    """Forwards TCP to `upstream`; cuts the first connection that carries a stream once it
    carried `cut_after` bytes back to the client (a dropped connection mid-stream).
    Records the bytes each connection sent upstream."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.requests: list[bytes] = []
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.requests.append(b"")
            index = len(self.requests) - 1
            threading.Thread(target=self._serve, args=(client, index), daemon=True).start()

    def _serve(self, client: socket.socket, index: int) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._up, args=(client, upstream, index), daemon=True).start()
        carried = 0
        with contextlib.suppress(OSError):
            while data := upstream.recv(4096):
                # The request went up before its answer came down: it is recorded.
                streaming = b"/stream" in self.requests[index]
                if streaming and not self.cuts and carried + len(data) > self.cut_after:
                    self.cuts += 1
                    client.sendall(data[: self.cut_after - carried])
                    break
                client.sendall(data)
                carried += len(data)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _up(self, client: socket.socket, upstream: socket.socket, index: int) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(4096):
                self.requests[index] += data
                upstream.sendall(data)

    def close(self) -> None:
        self.listener.close()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_follow_gets_every_event_of_a_live_job_once_across_a_dropped_connection(
    server: str, worker: Any, create_key: Any
) -> None:
    key = create_key("alice")
    direct = Client(server, key)
    job = direct.submit("train", _TRAIN)
    # Cut past the job's first events (a train job's stream runs to tens of kilobytes).
    proxy = DroppingProxy(_port(server), cut_after=6000)
    try:
        events = list(Client(f"http://127.0.0.1:{proxy.port}", key).follow(job["id"]))
    finally:
        proxy.close()

    # A stream's connection was cut, and the client came back from its last event.
    assert proxy.cuts == 1
    assert b"last-event-id:" in b"".join(proxy.requests).lower()

    kinds = [event["type"] for event in events]
    assert {"state", "progress", "metric", "log"} <= set(kinds)
    assert events[-1]["type"] == "state"
    assert events[-1]["state"] == "succeeded"
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states.count("succeeded") == 1
    assert "running" in states

    # Exactly the job's rows: every log line and metric point once, none twice.
    logged = [e["id"] for e in events if e["type"] == "log"]
    assert logged == [line["id"] for line in _all_lines(direct, job["id"])]
    points = [(e["name"], e["step"]) for e in events if e["type"] == "metric"]
    stored = {(name, p["step"]) for name, ps in direct.metrics(job["id"]).items() for p in ps}
    assert len(points) == len(set(points))
    assert set(points) == stored


def test_follow_polls_when_the_key_is_at_its_stream_limit(
    server: str, worker: Any, create_key: Any
) -> None:
    key = create_key("alice")
    client = Client(server, key)
    # Queued for a GPU this host has not: its stream stays open, holding the key's one slot.
    holder = client.submit("echo", {"device": "gpu"})
    job = client.submit("train", {**_TRAIN, "epochs": 5})
    held = client.http.get(f"{server}/api/v1/jobs/{holder['id']}/stream", stream=True)
    try:
        assert held.status_code == 200
        refused = client.http.get(f"{server}/api/v1/jobs/{job['id']}/stream")
        assert refused.status_code == 429  # the limit of 1 is taken: follow must poll
        events = list(client.follow(job["id"], poll_s=0.2))
    finally:
        held.close()
        client.cancel(holder["id"])
    assert events[-1]["state"] == "succeeded"
    logged = [e["id"] for e in events if e["type"] == "log"]
    assert logged == [line["id"] for line in _all_lines(client, job["id"])]
    points = [(e["name"], e["step"]) for e in events if e["type"] == "metric"]
    assert len(points) == len(set(points)) == sum(map(len, client.metrics(job["id"]).values()))


def _all_lines(client: Client, job_id: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    while batch := client.events(job_id, lines[-1]["id"] if lines else 0):
        lines += batch
    return lines


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_kiln_follow_prints_a_jobs_events_and_exits_by_its_state(
    server: str, worker: Any, create_key: Any
) -> None:
    env = {"KILN_URL": server, "KILN_API_KEY": create_key("alice")}
    client = Client(server, env["KILN_API_KEY"])
    ok = client.submit("train", {**_TRAIN, "epochs": 3})
    followed = CliRunner().invoke(main, ["follow", ok["id"]], env=env, catch_exceptions=False)
    assert followed.exit_code == 0, followed.output
    lines = followed.stdout.splitlines()
    assert lines[-1].startswith("state succeeded")
    assert any(line.startswith("metric ") for line in lines)

    failing = client.submit("echo", {"fail_with": "no luck"})
    as_json = CliRunner().invoke(main, ["--json", "follow", failing["id"]], env=env)
    assert as_json.exit_code == 1
    final = json.loads(as_json.stdout.splitlines()[-1])
    assert (final["type"], final["state"], final["error"]["message"]) == (
        "state",
        "failed",
        "no luck",
    )
