"""What kiln.Client (requests) and kiln.AsyncClient (httpx) share: the errors they raise,
each API call as data (`Call`), the mapping of an error answer to a typed error, and the
reading of a finished job. Neither transport is imported here; each client only sends a
Call and hands the answer back to `api_error` or `Call.pick`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from kiln.states import TERMINAL_STATES, JobState

DEFAULT_URL = "http://127.0.0.1:8000"
#: Bytes per read when streaming a download.
CHUNK = 1024 * 1024

#: Called with (bytes done, bytes in all or None) as a transfer moves.
ProgressCallback = Callable[[int, int | None], None]


class ClientError(Exception):
    """Base of what the clients raise."""


class ConnectionFailed(ClientError):
    """The server could not be reached."""


class InvalidInput(ClientError):
    """What the caller asked to send cannot be sent (NaN or infinity: JSON has no such number)."""


class WaitTimeout(ClientError):
    """wait() gave up before the job finished."""


class ApiError(ClientError):
    """The API answered an error: `status`, its machine-readable `code`, `detail`, `errors`."""

    def __init__(
        self, status: int, code: str, detail: str, errors: list[dict[str, Any]] | None = None
    ):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.errors = errors or []


class NotFoundError(ApiError):
    """404: no such job, model, dataset, schedule or key (or not yours), or no such route."""


class AuthError(ApiError):
    """401 or 403: no key, an unknown or revoked key, or a key without the role needed."""


class JobNotSucceeded(ClientError):
    """A job a handle waited for ended without succeeding; `job` is its final reading."""

    def __init__(self, job: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.job = job


class JobFailed(JobNotSucceeded):
    """The job failed: `error_type` and `reason` are the job's own error (its `error`)."""

    def __init__(self, job: dict[str, Any]) -> None:
        error = job.get("error") or {}
        self.error_type = str(error.get("type") or "JobFailed")
        self.reason = str(error.get("message") or job.get("message") or "failed")
        super().__init__(job, f"job {job['id']} failed: {self.error_type}: {self.reason}")


class JobCancelled(JobNotSucceeded):
    """The job was cancelled (by its owner, an admin, or its deadline)."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(job, f"job {job['id']} was cancelled")


def resolve_url(url: str | None) -> str:
    return (url or os.environ.get("KILN_URL") or DEFAULT_URL).rstrip("/")


def resolve_key(api_key: str | None) -> str:
    return api_key if api_key is not None else os.environ.get("KILN_API_KEY", "")


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def api_error(status: int, reason: str, body: Any) -> ApiError:
    """The typed error for an error answer; `body` is its parsed JSON (anything, or None
    when it was not JSON): a problem+json body gives the code, detail and field errors."""
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("code") or f"http_{status}")
    detail = str(body.get("detail") or reason or "error")
    errors = body.get("errors") if isinstance(body.get("errors"), list) else []
    kind = NotFoundError if status == 404 else AuthError if status in (401, 403) else ApiError
    return kind(status, code, detail, errors)


def finished(job: dict[str, Any]) -> bool:
    return job["state"] in TERMINAL_STATES


def succeeded_or_raise(job: dict[str, Any]) -> dict[str, Any]:
    """A finished job if it succeeded; JobFailed or JobCancelled otherwise."""
    if job["state"] == JobState.FAILED:
        raise JobFailed(job)
    if job["state"] == JobState.CANCELLED:
        raise JobCancelled(job)
    return job


def timed_out(job: dict[str, Any], timeout_s: float | None) -> WaitTimeout:
    return WaitTimeout(f"job {job['id']} is still {job['state']} after {timeout_s}s")


def _whole(answer: Any) -> Any:
    return answer


@dataclass(frozen=True)
class Call:
    """One API request: method, path under /api/v1, query, JSON body, headers; `pick`
    takes the part of the parsed answer the method returns (the whole answer by default)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    pick: Callable[[Any], Any] = _whole
    #: The answer has no body (204): the client returns None without parsing.
    empty: bool = False


def _key(name: str) -> Callable[[Any], Any]:
    return lambda answer: answer[name]


# Every call of the API, once; both clients send these.


def submit(
    kind: str,
    spec: dict[str, Any],
    priority: int,
    idempotency_key: str | None,
    **fields: Any,
) -> Call:
    """POST /jobs; `fields` are the submission's optional top-level fields (tags,
    deadline_s, expires_after, webhook_url, webhook_events), sent only when given."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    body: dict[str, Any] = {"kind": kind, "spec": spec, "priority": priority}
    body |= {name: value for name, value in fields.items() if value not in (None, {}, [])}
    return Call("POST", "/jobs", json=body, headers=headers)


def job(job_id: str) -> Call:
    return Call("GET", f"/jobs/{job_id}")


def jobs_params(
    state: str | None, kind: str | None, limit: int | None, tags: list[str] | None = None
) -> dict[str, Any]:
    """The first page's query of a listing that follows pages up to `limit` jobs; `tags`
    (["team:nlp", "env"]) keeps jobs carrying every one (`key` alone: any value)."""
    params: dict[str, Any] = {"state": state, "kind": kind, "limit": min(limit or 200, 200)}
    if tags:
        params["tag"] = list(tags)
    return params


def jobs_page(params: dict[str, Any]) -> Call:
    """One page of jobs; `next_cursor` in the answer names the next (None at the end)."""
    return Call("GET", "/jobs", params=dict(params))


def cancel(job_id: str) -> Call:
    return Call("POST", f"/jobs/{job_id}/cancel")


def delete_job(job_id: str) -> Call:
    return Call("DELETE", f"/jobs/{job_id}", empty=True)


def delete_model(name: str) -> Call:
    return Call("DELETE", f"/models/{name}", empty=True)


def metrics(job_id: str) -> Call:
    return Call("GET", f"/jobs/{job_id}/metrics", pick=_key("series"))


def events(job_id: str, after: int) -> Call:
    return Call("GET", f"/jobs/{job_id}/events", params={"after": after}, pick=_key("events"))


def output(job_id: str, errors: bool) -> Call:
    return Call("GET", f"/jobs/{job_id}/{'errors' if errors else 'output'}")


def datasets() -> Call:
    return Call("GET", "/datasets", pick=_key("datasets"))


def dataset(dataset_id: str) -> Call:
    return Call("GET", f"/datasets/{dataset_id}")


def models() -> Call:
    return Call("GET", "/models", pick=_key("models"))


def model(name: str) -> Call:
    return Call("GET", f"/models/{name}")


def model_version(name: str, version: str | int) -> Call:
    return Call("GET", f"/models/{name}/versions/{version}")


def set_alias(name: str, alias: str, version: int) -> Call:
    return Call("PUT", f"/models/{name}/aliases/{alias}", json={"version": version})


def delete_alias(name: str, alias: str) -> Call:
    return Call("DELETE", f"/models/{name}/aliases/{alias}")


def create_key(owner: str, role: str) -> Call:
    return Call("POST", "/keys", json={"owner": owner, "role": role})


def keys() -> Call:
    return Call("GET", "/keys", pick=_key("keys"))


def revoke_key(key_id: str) -> Call:
    return Call("DELETE", f"/keys/{key_id}")


def create_schedule(
    name: str,
    cron: str,
    kind: str,
    spec: dict[str, Any],
    priority: int,
    enabled: bool,
    **fields: Any,
) -> Call:
    """POST /schedules; `fields` as for `submit`: the job template's optional fields."""
    body: dict[str, Any] = {
        "name": name,
        "cron": cron,
        "kind": kind,
        "spec": spec,
        "priority": priority,
        "enabled": enabled,
    }
    body |= {name: value for name, value in fields.items() if value not in (None, {}, [])}
    return Call("POST", "/schedules", json=body)


def schedules() -> Call:
    return Call("GET", "/schedules", pick=_key("schedules"))


def schedule(schedule_id: str) -> Call:
    return Call("GET", f"/schedules/{schedule_id}")


def pause_schedule(schedule_id: str) -> Call:
    return Call("POST", f"/schedules/{schedule_id}/pause")


def resume_schedule(schedule_id: str) -> Call:
    return Call("POST", f"/schedules/{schedule_id}/resume")


def delete_schedule(schedule_id: str) -> Call:
    return Call("DELETE", f"/schedules/{schedule_id}", empty=True)


def workers() -> Call:
    return Call("GET", "/workers", pick=_key("workers"))


# Downloads


def download_target(headers: Any, job_id: str, dest: Path | str | None) -> Path:
    """Where a download goes: `dest`, or in the folder `dest` (default: here) under the
    name the server's Content-Disposition offers. A `dest` that ends with a slash, or is an
    existing folder, is a folder (created if missing): `-o out/` never writes a file `out`."""
    name = _filename(headers.get("Content-Disposition", "")) or f"{job_id}.out"
    if dest is None:
        return Path.cwd() / name
    text = os.fspath(dest)
    target = Path(text)
    if text.endswith(("/", os.sep)) or target.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return target / name
    return target


def partial_path(target: Path) -> Path:
    """The name a download is written under until it is whole."""
    return target.with_name(f".{target.name}.part")


def _filename(disposition: str) -> str | None:
    """The file name a Content-Disposition header offers, stripped of any folder part."""
    match = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", disposition)
    if not match:
        return None
    name = Path(unquote(match.group(1))).name
    return name or None
