"""kiln.AsyncClient: kiln.Client's API for asyncio programs, over httpx.

    from kiln import AsyncClient
    async with AsyncClient() as kiln:    # KILN_URL and KILN_API_KEY, or url=, api_key=
        job = await kiln.submit("train", {"model_name": "digits", "epochs": 5})
        await job.wait()                 # JobFailed / JobCancelled unless it succeeded

The same methods, answers and errors as kiln.Client (kiln/client.py), awaited; both send
the calls of kiln/client_core.py and map errors there, so the two never drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import httpx

from kiln import client_core as calls
from kiln import client_progress
from kiln.client_core import ConnectionFailed, InvalidInput, ProgressCallback

#: Called with each reading of a job; may be a coroutine function.
OnUpdate = Callable[[dict[str, Any]], Awaitable[None] | None]


#: What a final state event carries (as kiln/follow.py sends it).
_STATE_FIELDS = ("state", "attempt", "progress", "message", "error")


class AsyncJob(dict[str, Any]):
    """A submitted job, as kiln.client.Job, whose methods are awaited."""

    def __init__(self, client: AsyncClient, answer: dict[str, Any]) -> None:
        super().__init__(answer)
        self.client = client

    @property
    def id(self) -> str:
        return str(self["id"])

    async def refresh(self) -> AsyncJob:
        self.update(await self.client.job(self.id))
        return self

    async def cancel(self) -> AsyncJob:
        self.update(await self.client.cancel(self.id))
        return self

    async def wait(
        self,
        *,
        progress: bool | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> AsyncJob:
        """As kiln.client.Job.wait: this handle if the job succeeded; JobFailed,
        JobCancelled or WaitTimeout otherwise; a bar on stderr when `progress`."""
        draw = client_progress.wanted(progress)
        with client_progress.wait_bar(self.id, draw) as show:

            async def on_update(job: dict[str, Any]) -> None:
                self.update(job)
                latest = ""
                if draw and client_progress.needs_metrics(job):
                    latest = client_progress.latest_metrics(await self.client.metrics(self.id))
                show(job, latest)

            await self.client.wait(self.id, poll_s=poll_s, timeout_s=timeout_s, on_update=on_update)
        calls.succeeded_or_raise(self)
        return self


class AsyncClient:
    """A Kiln server at `url`, called with `api_key` (defaults: KILN_URL, KILN_API_KEY).
    Close it with `await client.aclose()`, or use it as `async with AsyncClient() as c:`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = calls.resolve_url(url)
        self.api_key = calls.resolve_key(api_key)
        self.timeout_s = timeout_s
        self.http = http or httpx.AsyncClient(timeout=timeout_s)
        self.http.headers.update(calls.auth_headers(self.api_key))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # Jobs

    async def submit(
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
    ) -> AsyncJob:
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
        answer = await self._send(call)
        return AsyncJob(self, answer)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._send(calls.job(job_id))  # type: ignore[no-any-return]

    async def jobs(
        self,
        state: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        *,
        tags: list[str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Your jobs, newest first, following the pages until `limit` (or the end); `tags`
        as for Client.jobs."""
        params = calls.jobs_params(state, kind, limit, tags)
        seen = 0
        while True:
            page = await self._send(calls.jobs_page(params))
            for job in page["jobs"]:
                yield job
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._send(calls.cancel(job_id))  # type: ignore[no-any-return]

    async def delete_job(self, job_id: str) -> None:
        await self._send(calls.delete_job(job_id))

    async def metrics(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        return await self._send(calls.metrics(job_id))  # type: ignore[no-any-return]

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        return await self._send(calls.events(job_id, after))  # type: ignore[no-any-return]

    async def follow(self, job_id: str, poll_s: float = 1.0) -> AsyncIterator[dict[str, Any]]:
        """The job's log lines as they are written (`type` "log"), then its final state
        (`type` "state"), by polling: Client.follow's events less the live stream's
        progress and metric points."""
        after = 0
        while True:
            job = await self.job(job_id)  # state first: see Client.follow
            for event in await self.events(job_id, after):
                after = event["id"]
                yield {"type": "log", **event}
            if calls.finished(job):
                yield {"type": "state", **{k: job.get(k) for k in _STATE_FIELDS}}
                return
            await asyncio.sleep(poll_s)

    async def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        on_update: OnUpdate | None = None,
    ) -> dict[str, Any]:
        """Poll until the job finishes and return it, whatever its state; `on_update`
        (a function or a coroutine function) sees each reading."""
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = await self.job(job_id)
            if on_update is not None:
                seen = on_update(job)
                if inspect.isawaitable(seen):
                    await seen
            if calls.finished(job):
                return job
            if time.monotonic() >= deadline:
                raise calls.timed_out(job, timeout_s)
            await asyncio.sleep(poll_s)

    async def download_output(
        self,
        job_id: str,
        dest: Path | str | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        errors: bool = False,
    ) -> Path:
        """As Client.download_output: streamed to a partial file, renamed once whole."""
        call = calls.output(job_id, errors)
        request = self.http.build_request(call.method, self._url(call))
        response = await self._exchange(request, stream=True)
        try:
            target = calls.download_target(response.headers, job_id, dest)
            total = response.headers.get("Content-Length")
            partial = calls.partial_path(target)
            with partial.open("wb") as out:
                async for chunk in response.aiter_bytes(calls.CHUNK):
                    out.write(chunk)
                    if on_progress is not None:
                        on_progress(response.num_bytes_downloaded, int(total) if total else None)
            partial.replace(target)
        finally:
            await response.aclose()
        return target

    # Datasets

    async def upload_dataset(
        self, path: Path, name: str | None = None, on_progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Upload a CSV (or Parquet) file, streamed from disk."""
        with path.open("rb") as handle:
            counted = _Counted(handle, path.stat().st_size, on_progress)
            files = {"file": (path.name, counted, "application/octet-stream")}
            data = {"name": name} if name else None
            call = calls.Call("POST", "/datasets")
            return await self._send(call, files=files, data=data)  # type: ignore[no-any-return]

    async def datasets(self) -> list[dict[str, Any]]:
        return await self._send(calls.datasets())  # type: ignore[no-any-return]

    async def dataset(self, dataset_id: str) -> dict[str, Any]:
        return await self._send(calls.dataset(dataset_id))  # type: ignore[no-any-return]

    # Models

    async def models(self) -> list[dict[str, Any]]:
        return await self._send(calls.models())  # type: ignore[no-any-return]

    async def model(self, name: str) -> dict[str, Any]:
        return await self._send(calls.model(name))  # type: ignore[no-any-return]

    async def model_version(self, name: str, version: str | int = "latest") -> dict[str, Any]:
        return await self._send(calls.model_version(name, version))  # type: ignore[no-any-return]

    async def push_model(
        self,
        directory: Path,
        name: str,
        task: str,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """As Client.push_model: the directory's model files, streamed from disk."""
        from kiln.hfdir import files_to_push

        paths, _ = files_to_push(directory)
        total = sum(p.stat().st_size for p in paths)
        sent = [0]  # shared by the files' counters: progress over the whole push

        def on_bytes(done: int, _total: int | None) -> None:
            if on_progress is not None:
                on_progress(done, total)

        with contextlib.ExitStack() as opened:
            files = [
                (
                    "files",
                    (
                        p.name,
                        _Counted(opened.enter_context(p.open("rb")), total, on_bytes, sent),
                        "application/octet-stream",
                    ),
                )
                for p in paths
            ]
            call = calls.Call("POST", f"/models/{name}/versions")
            answer = await self._send(call, files=files, data={"family": "hf", "task": task})
            return answer  # type: ignore[no-any-return]

    async def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        return await self._send(calls.set_alias(name, alias, version))  # type: ignore[no-any-return]

    async def delete_alias(self, name: str, alias: str) -> dict[str, Any]:
        return await self._send(calls.delete_alias(name, alias))  # type: ignore[no-any-return]

    # Schedules

    async def create_schedule(
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
        return await self._send(call)  # type: ignore[no-any-return]

    async def schedules(self) -> list[dict[str, Any]]:
        return await self._send(calls.schedules())  # type: ignore[no-any-return]

    async def schedule(self, schedule_id: str) -> dict[str, Any]:
        return await self._send(calls.schedule(schedule_id))  # type: ignore[no-any-return]

    async def pause_schedule(self, schedule_id: str) -> dict[str, Any]:
        return await self._send(calls.pause_schedule(schedule_id))  # type: ignore[no-any-return]

    async def resume_schedule(self, schedule_id: str) -> dict[str, Any]:
        return await self._send(calls.resume_schedule(schedule_id))  # type: ignore[no-any-return]

    async def delete_model(self, name: str) -> None:
        await self._send(calls.delete_model(name))

    async def delete_schedule(self, schedule_id: str) -> None:
        await self._send(calls.delete_schedule(schedule_id))

    # Operators (admin)

    async def workers(self) -> list[dict[str, Any]]:
        return await self._send(calls.workers())  # type: ignore[no-any-return]

    async def create_key(self, owner: str, role: str = "user") -> dict[str, Any]:
        return await self._send(calls.create_key(owner, role))  # type: ignore[no-any-return]

    async def keys(self) -> list[dict[str, Any]]:
        return await self._send(calls.keys())  # type: ignore[no-any-return]

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        return await self._send(calls.revoke_key(key_id))  # type: ignore[no-any-return]

    # Plumbing

    def _url(self, call: calls.Call) -> str:
        return f"{self.url}/api/v1{call.path}"

    async def _send(self, call: calls.Call, **kwargs: Any) -> Any:
        """Send `call`; its picked part of the parsed answer (see Client._send)."""
        params = {k: v for k, v in (call.params or {}).items() if v is not None}
        headers = dict(call.headers)
        if call.json is not None:
            try:  # encoded here: whatever httpx's version, NaN and infinity never leave
                kwargs["content"] = json.dumps(call.json, allow_nan=False).encode()
            except ValueError:
                raise InvalidInput("JSON has no NaN or infinity: send finite numbers") from None
            headers["Content-Type"] = "application/json"
        request = self.http.build_request(
            call.method, self._url(call), params=params, headers=headers, **kwargs
        )
        response = await self._exchange(request)
        return None if call.empty else call.pick(response.json())

    async def _exchange(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        try:
            response = await self.http.send(request, stream=stream)
        except httpx.TimeoutException:
            raise ConnectionFailed(f"Kiln at {self.url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach Kiln at {self.url}: {exc}") from None
        if response.status_code >= 400:
            if stream:
                await response.aread()
                await response.aclose()
            raise calls.api_error(response.status_code, response.reason_phrase, _json(response))
        return response


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class _Counted:
    """A binary file that reports the bytes read from it (httpx reads uploads in chunks)."""

    def __init__(
        self,
        handle: IO[bytes],
        total: int,
        on_progress: ProgressCallback | None,
        sent: list[int] | None = None,
    ) -> None:
        self._handle, self._total, self._on_progress = handle, total, on_progress
        self._sent = sent if sent is not None else [0]

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._sent[0] += len(chunk)
        if self._on_progress is not None and chunk:
            self._on_progress(self._sent[0], self._total)
        return chunk

    def __getattr__(self, name: str) -> Any:  # seek, tell, fileno: httpx sizes the file
        return getattr(self._handle, name)
