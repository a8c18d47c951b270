"""`Client.follow`: a job's events as they happen, from its live stream
(GET /api/v1/jobs/<id>/stream), reconnecting with Last-Event-ID after a dropped
connection, and polling the job, its log and its metrics where no stream can be had (an
older server, a key or web process at its stream limit).

Each event is a dict with a `type`: `state` (state, attempt, progress, message, error),
`progress` (progress, message), `metric` (id, name, step, value, at) or `log` (id, at,
level, message). Following ends after the job's final state event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import requests

from kiln import sse
from kiln.client_core import api_error
from kiln.states import TERMINAL_STATES

if TYPE_CHECKING:
    from kiln.client import Client

#: Answers that mean "no stream for you now, poll instead" (the job itself exists).
_POLL_INSTEAD = {404, 405, 429, 501, 503}
#: Reconnections in a row that may fail before following gives up.
MAX_RECONNECTS = 8


class StreamUnavailable(Exception):
    """The server offers no stream for this job now: follow by polling."""


def follow(
    client: Client,
    job_id: str,
    *,
    poll_s: float = 1.0,
    read_timeout_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """The job's events until its final state (see the module's docstring)."""
    client.job(job_id)  # 404 (NotFoundError) for a job that is not there, before anything
    seen = _Seen()
    last_id = ""
    failures = 0
    while True:
        try:
            for event in _stream_once(client, job_id, last_id, read_timeout_s):
                last_id = event.id or last_id
                failures = 0
                data = event.json()
                seen.note(data)
                yield data
                if data.get("type") == "state" and data.get("state") in TERMINAL_STATES:
                    return
        except StreamUnavailable:
            yield from _poll(client, job_id, poll_s, sleep, seen)
            return
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            failures += 1
            if failures > MAX_RECONNECTS:
                from kiln.client import ConnectionFailed  # kiln.client imports this module

                raise ConnectionFailed(f"lost the stream of job {job_id}: {exc}") from None
        # Dropped, or ended before the final state: reconnect from the last event seen.
        sleep(min(poll_s * 2 ** (failures - 1), 30.0) if failures else poll_s)


class _Seen:
    """What the caller was given, so that polling after a stream repeats none of it."""

    def __init__(self) -> None:
        self.log_id = 0
        self.points: set[tuple[str, int]] = set()
        self.state: tuple[Any, ...] | None = None
        self.progress: tuple[Any, ...] | None = None

    def note(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "log":
            self.log_id = max(self.log_id, int(event["id"]))
        elif kind == "metric":
            self.points.add((event["name"], event["step"]))
        elif kind in {"state", "progress"}:
            self.progress = (event.get("progress"), event.get("message"))
            if kind == "state":
                self.state = (event["state"], event.get("attempt"))


def _stream_once(
    client: Client, job_id: str, last_id: str, read_timeout_s: float
) -> Iterator[sse.Event]:
    headers = {"Accept": sse.MEDIA_TYPE}
    if last_id:
        headers["Last-Event-ID"] = last_id
    url = f"{client.url}/api/v1/jobs/{job_id}/stream"
    with client.http.get(
        url, headers=headers, stream=True, timeout=(client.timeout_s, read_timeout_s)
    ) as response:
        if response.status_code in _POLL_INSTEAD:
            raise StreamUnavailable(response.status_code)
        if response.status_code >= 400:
            from kiln.client import _json_or_none

            raise api_error(response.status_code, response.reason, _json_or_none(response))
        if not response.headers.get("Content-Type", "").startswith(sse.MEDIA_TYPE):
            raise StreamUnavailable(response.status_code)
        yield from sse.events(response.iter_content(chunk_size=None))


def _poll(
    client: Client,
    job_id: str,
    poll_s: float,
    sleep: Callable[[float], None],
    seen: _Seen,
) -> Iterator[dict[str, Any]]:
    """The same events, read by polling the job, its log (after the last line given) and
    its metrics (points not given yet)."""
    while True:
        job = client.job(job_id)  # before the rows: a final state's rows are all in
        for line in client.events(job_id, seen.log_id):
            event = {"type": "log", **line}
            seen.note(event)
            yield event
        for name, points in sorted(client.metrics(job_id).items()):
            for point in points:
                if (name, point["step"]) not in seen.points:
                    event = {"type": "metric", "name": name, **point}
                    seen.note(event)
                    yield event
        state = (job["state"], job.get("attempt"))
        progress = (job.get("progress"), job.get("message"))
        if state != seen.state:
            event = {"type": "state", "state": job["state"], "attempt": job.get("attempt")}
            event.update(progress=progress[0], message=progress[1], error=job.get("error"))
            seen.note(event)
            yield event
        elif progress != seen.progress:
            event = {"type": "progress", "progress": progress[0], "message": progress[1]}
            seen.note(event)
            yield event
        if job["state"] in TERMINAL_STATES:
            return
        sleep(poll_s)
