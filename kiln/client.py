"""kiln.Client: Kiln's HTTP API from Python (the `kiln` CLI's client commands use it).

    from kiln import Client
    kiln = Client()                      # KILN_URL and KILN_API_KEY, or pass url=, api_key=
    job = kiln.submit("train", {"model_name": "digits", "epochs": 5})
    job.wait()                           # progress bar on a terminal; JobFailed if it failed
    done = kiln.wait(job["id"])          # or: the final job, whatever its state

Answers are the API's JSON as dicts (`submit` returns a `Job`, a dict that can also wait
for itself). Errors raise ApiError (NotFoundError, AuthError for 404 and 401/403)
carrying the problem+json `code`, or ConnectionFailed. kiln.AsyncClient (kiln/aclient.py)
is the same API over httpx; both send the calls of kiln/client_core.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from kiln import client_core as calls
from kiln import client_progress
from kiln.client_core import (
    ApiError,
    AuthError,
    ClientError,
    ConnectionFailed,
    InvalidInput,
    JobCancelled,
    JobFailed,
    JobNotSucceeded,
    NotFoundError,
    ProgressCallback,
    WaitTimeout,
)
from kiln.follow import follow as follow_job

__all__ = [
    "ApiError",
    "AuthError",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "InvalidInput",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobNotSucceeded",
    "NotFoundError",
    "ProgressCallback",
    "WaitTimeout",
]


class Job(dict[str, Any]):
    """A submitted job: the API's JSON of it (a dict, as `submit` has always returned), that
    can also follow itself. `wait()` raises JobFailed or JobCancelled unless it succeeded."""

    def __init__(self, client: Client, answer: dict[str, Any]) -> None:
        super().__init__(answer)
        self.client = client

    @property
    def id(self) -> str:
        return str(self["id"])

    def refresh(self) -> Job:
        """Read the job again; returns this handle, updated."""
        self.update(self.client.job(self.id))
        return self

    def cancel(self) -> Job:
        self.update(self.client.cancel(self.id))
        return self

    def wait(
        self,
        *,
        progress: bool | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> Job:
        """Poll until the job finishes; this handle, updated, if it succeeded. A progress bar
        with the latest metrics is drawn on stderr when `progress` (default: when stderr is a
        terminal). Raises JobFailed (with the job's error type and reason), JobCancelled,
        or WaitTimeout past `timeout_s`."""
        draw = client_progress.wanted(progress)
        with client_progress.wait_bar(self.id, draw) as show:

            def on_update(job: dict[str, Any]) -> None:
                self.update(job)
                latest = ""
                if draw and client_progress.needs_metrics(job):  # no extra call unseen
                    latest = client_progress.latest_metrics(self.client.metrics(self.id))
                show(job, latest)

            self.client.wait(self.id, poll_s=poll_s, timeout_s=timeout_s, on_update=on_update)
        calls.succeeded_or_raise(self)
        return self


class Client:
    """A Kiln server at `url`, called with `api_key` (defaults: KILN_URL, KILN_API_KEY)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = calls.resolve_url(url)
        self.api_key = calls.resolve_key(api_key)
        self.timeout_s = timeout_s
        self.http = session or requests.Session()
        self.http.headers.update(calls.auth_headers(self.api_key))

    # Jobs

    def submit(
        self,
        kind: str,
        spec: dict[str, Any],
        priority: int = 0,
        idempotency_key: str | None = None,
        *,
        tags: dict[str, str] | None = None,
        deadline_s: float | None = None,
        expires_after: int | None = None,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
    ) -> Job:
        """Queue a job; the server validates `spec` with the kind's schema (422 if wrong).
        With an `idempotency_key`, retrying the same call returns the same job. `tags`
        label it (at most 16; list by them with jobs(tags=...)); past `deadline_s` seconds
        from now it is cancelled, queued or running; `expires_after`: seconds its output
        files and log lines outlive it (default: the server's KILN_RETENTION_DAYS); with a
        `webhook_url`, the server POSTs `webhook_events` to it (docs/webhooks.md). The
        answer is a `Job`: the job's JSON, with `.wait()`."""
        call = calls.submit(
            kind,
            spec,
            priority,
            idempotency_key,
            tags=tags,
            deadline_s=deadline_s,
            expires_after=expires_after,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
        )
        return Job(self, self._send(call))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._send(calls.job(job_id))  # type: ignore[no-any-return]

    def jobs(
        self,
        state: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        *,
        tags: list[str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Your jobs, newest first, following the pages until `limit` (or the end); `tags`
        (["team:nlp", "env"]) keeps those carrying every one (`key` alone: any value)."""
        params = calls.jobs_params(state, kind, limit, tags)
        seen = 0
        while True:
            page = self._send(calls.jobs_page(params))
            for job in page["jobs"]:
                yield job
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._send(calls.cancel(job_id))  # type: ignore[no-any-return]

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its log lines, metrics and files (409 while it is
        queued or running: cancel it first)."""
        self._send(calls.delete_job(job_id))

    def metrics(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        """Metric series by name: [{"step", "value", "at"}, ...]."""
        return self._send(calls.metrics(job_id))  # type: ignore[no-any-return]

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """Log lines with an id above `after`, oldest first."""
        return self._send(calls.events(job_id, after))  # type: ignore[no-any-return]

    def follow(self, job_id: str, poll_s: float = 1.0) -> Iterator[dict[str, Any]]:
        """The job's events as they happen, until its final state: dicts with a `type`
        (`state`, `progress`, `metric`, `log`), from its live stream (reconnecting after
        a dropped connection without losing or repeating an event), or by polling where
        the server offers no stream (kiln/follow.py)."""
        return follow_job(self, job_id, poll_s=poll_s)

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job finishes and return it, whatever its state; `on_update` sees
        each reading. (A `Job`'s own `.wait()` raises when it did not succeed.)"""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if calls.finished(job):
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise calls.timed_out(job, timeout_s)
            time.sleep(poll_s)

    def download_output(
        self,
        job_id: str,
        dest: Path | str | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        errors: bool = False,
    ) -> Path:
        """Save the job's output file (or with `errors`, its error file: the rows that could
        not be scored) to `dest` (a file, or a folder to keep the server's file name in;
        default: the current folder); returns the path written."""
        call = calls.output(job_id, errors)
        response = self._request(call.method, call.path, stream=True)
        with response:
            target = calls.download_target(response.headers, job_id, dest)
            total = response.headers.get("Content-Length")
            done = 0
            partial = calls.partial_path(target)
            with partial.open("wb") as out:
                for chunk in response.iter_content(calls.CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, int(total) if total else None)
            partial.replace(target)  # a broken download leaves no file that looks whole
        return target

    # Datasets

    def upload_dataset(
        self, path: Path, name: str | None = None, on_progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Upload a CSV (or Parquet) file, streamed: memory use does not grow with its size."""
        from requests_toolbelt import MultipartEncoder, MultipartEncoderMonitor

        with path.open("rb") as handle:
            fields: dict[str, Any] = {"file": (path.name, handle, "application/octet-stream")}
            if name:
                fields["name"] = name
            encoder = MultipartEncoder(fields)
            monitor = MultipartEncoderMonitor(
                encoder,
                (lambda m: on_progress(m.bytes_read, m.len)) if on_progress else None,
            )
            call = calls.Call("POST", "/datasets", headers={"Content-Type": monitor.content_type})
            return self._send(call, data=monitor)  # type: ignore[no-any-return]

    def datasets(self) -> list[dict[str, Any]]:
        return self._send(calls.datasets())  # type: ignore[no-any-return]

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._send(calls.dataset(dataset_id))  # type: ignore[no-any-return]

    # Models

    def models(self) -> list[dict[str, Any]]:
        return self._send(calls.models())  # type: ignore[no-any-return]

    def model(self, name: str) -> dict[str, Any]:
        return self._send(calls.model(name))  # type: ignore[no-any-return]

    def model_version(self, name: str, version: str | int = "latest") -> dict[str, Any]:
        """A version by number, alias (production) or `latest`."""
        return self._send(calls.model_version(name, version))  # type: ignore[no-any-return]

    def push_model(
        self,
        directory: Path,
        name: str,
        task: str,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Register a Hugging Face model directory (config, tokenizer, safetensors) as the
        next version of `name`, for `task` (embedding, text-classification,
        token-classification, text-generation). Streamed; READMEs, subfolders and
        sentence-transformers' own files are left out (kiln.hfdir.files_to_push)."""
        from requests_toolbelt import MultipartEncoder, MultipartEncoderMonitor

        from kiln.hfdir import files_to_push

        paths, _ = files_to_push(directory)
        with contextlib.ExitStack() as files:
            fields: list[tuple[str, Any]] = [("family", "hf"), ("task", task)]
            for path in paths:
                handle = files.enter_context(path.open("rb"))
                fields.append(("files", (path.name, handle, "application/octet-stream")))
            monitor = MultipartEncoderMonitor(
                MultipartEncoder(fields),
                (lambda m: on_progress(m.bytes_read, m.len)) if on_progress else None,
            )
            call = calls.Call(
                "POST", f"/models/{name}/versions", headers={"Content-Type": monitor.content_type}
            )
            return self._send(call, data=monitor)  # type: ignore[no-any-return]

    def delete_model(self, name: str) -> None:
        """Delete a model and all its versions (409 while an alias points at one, or a
        queued or running job names it)."""
        self._send(calls.delete_model(name))

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """Point `alias` at a version (needs a server with PUT /models/<name>/aliases/<alias>)."""
        return self._send(calls.set_alias(name, alias, version))  # type: ignore[no-any-return]

    def delete_alias(self, name: str, alias: str) -> dict[str, Any]:
        """Remove `alias` from model `name` (its version stays); returns the model."""
        return self._send(calls.delete_alias(name, alias))  # type: ignore[no-any-return]

    # Schedules

    def create_schedule(
        self,
        name: str,
        cron: str,
        kind: str,
        spec: dict[str, Any],
        priority: int = 0,
        enabled: bool = True,
        *,
        tags: dict[str, str] | None = None,
        deadline_s: float | None = None,
        expires_after: int | None = None,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
    ) -> dict[str, Any]:
        """A cron schedule (five fields, UTC) that submits `kind` with `spec` at each slot;
        its jobs count against your queue quota like submitted ones."""
        call = calls.create_schedule(
            name,
            cron,
            kind,
            spec,
            priority,
            enabled,
            tags=tags,
            deadline_s=deadline_s,
            expires_after=expires_after,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
        )
        return self._send(call)  # type: ignore[no-any-return]

    def schedules(self) -> list[dict[str, Any]]:
        return self._send(calls.schedules())  # type: ignore[no-any-return]

    def schedule(self, schedule_id: str) -> dict[str, Any]:
        return self._send(calls.schedule(schedule_id))  # type: ignore[no-any-return]

    def pause_schedule(self, schedule_id: str) -> dict[str, Any]:
        return self._send(calls.pause_schedule(schedule_id))  # type: ignore[no-any-return]

    def resume_schedule(self, schedule_id: str) -> dict[str, Any]:
        return self._send(calls.resume_schedule(schedule_id))  # type: ignore[no-any-return]

    def delete_schedule(self, schedule_id: str) -> None:
        self._send(calls.delete_schedule(schedule_id))

    # Operators (admin)

    def workers(self) -> list[dict[str, Any]]:
        """The live workers: host, devices, queues, current job, last heartbeat (admin)."""
        return self._send(calls.workers())  # type: ignore[no-any-return]

    def create_key(self, owner: str, role: str = "user") -> dict[str, Any]:
        """A new key; its `key` field is the secret, shown this once."""
        return self._send(calls.create_key(owner, role))  # type: ignore[no-any-return]

    def keys(self) -> list[dict[str, Any]]:
        return self._send(calls.keys())  # type: ignore[no-any-return]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._send(calls.revoke_key(key_id))  # type: ignore[no-any-return]

    # Plumbing

    def _send(self, call: calls.Call, **kwargs: Any) -> Any:
        """Send `call`; its picked part of the parsed answer (Any to mypy: the methods
        above promise the shapes the API documents)."""
        response = self._request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            headers=call.headers,
            **kwargs,
        )
        return None if call.empty else call.pick(response.json())

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request to /api/v1`path`; an error answer raises its typed error."""
        url = f"{self.url}/api/v1{path}"
        try:
            response = self.http.request(method, url, timeout=self.timeout_s, **kwargs)
        except requests.ConnectionError as exc:
            raise ConnectionFailed(
                f"cannot reach Kiln at {self.url}: {_socket_reason(exc)}"
            ) from None
        except requests.Timeout:
            raise ConnectionFailed(f"Kiln at {self.url} did not answer in time") from None
        except requests.exceptions.InvalidJSONError:
            raise InvalidInput("JSON has no NaN or infinity: send finite numbers") from None
        if response.status_code >= 400:
            raise calls.api_error(response.status_code, response.reason, _json_or_none(response))
        return response


def _socket_reason(exc: BaseException) -> str:
    """What the socket said ("Connection refused", "Name or service not known"), found
    under urllib3's retry and connection wrappers; their own words if there is none."""
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        found = pending.pop(0)
        if found is None or id(found) in seen:
            continue
        seen.add(id(found))
        if isinstance(found, OSError) and found.strerror:
            return found.strerror
        wrapped = [a for a in found.args if isinstance(a, BaseException)]
        pending += [getattr(found, "reason", None), found.__cause__, found.__context__, *wrapped]
    return str(exc)


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
