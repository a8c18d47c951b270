"""kiln.Client: Kiln's HTTP API from Python (the `kiln` CLI's client commands use it).

    from kiln import Client
    kiln = Client()                      # KILN_URL and KILN_API_KEY, or pass url=, api_key=
    job = kiln.submit("train", {"model_name": "digits", "epochs": 5})
    done = kiln.wait(job["id"])          # the final job; done["state"] == "succeeded"

Answers are the API's JSON as dicts. Errors raise ApiError (NotFoundError, AuthError for
404 and 401/403) carrying the problem+json `code`, or ConnectionFailed.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import requests

from kiln.follow import follow as follow_job
from kiln.states import TERMINAL_STATES

DEFAULT_URL = "http://127.0.0.1:8000"
_CHUNK = 1024 * 1024

#: Called with (bytes done, bytes in all or None) as a transfer moves.
ProgressCallback = Callable[[int, int | None], None]


class ClientError(Exception):
    """Base of what the client raises."""


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
    """404: no such job, model, dataset or key (or not yours), or no such route."""


class AuthError(ApiError):
    """401 or 403: no key, an unknown or revoked key, or a key without the role needed."""


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
        self.url = (url or os.environ.get("KILN_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("KILN_API_KEY", "")
        self.timeout_s = timeout_s
        self.http = session or requests.Session()
        if self.api_key:
            self.http.headers["Authorization"] = f"Bearer {self.api_key}"

    # Jobs

    def submit(
        self,
        kind: str,
        spec: dict[str, Any],
        priority: int = 0,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Queue a job; the server validates `spec` with the kind's schema (422 if wrong).
        With an `idempotency_key`, retrying the same call returns the same job."""
        body = {"kind": kind, "spec": spec, "priority": priority}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/jobs", json=body, headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/jobs/{job_id}")

    def jobs(
        self, state: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Your jobs, newest first, following the pages until `limit` (or the end)."""
        params: dict[str, Any] = {"state": state, "kind": kind, "limit": min(limit or 200, 200)}
        seen = 0
        while True:
            page = self._json("GET", "/jobs", params=params)
            for job in page["jobs"]:
                yield job
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def metrics(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        """Metric series by name: [{"step", "value", "at"}, ...]."""
        return self._json("GET", f"/jobs/{job_id}/metrics")["series"]  # type: ignore[no-any-return]

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """Log lines with an id above `after`, oldest first."""
        page = self._json("GET", f"/jobs/{job_id}/events", params={"after": after})
        return page["events"]  # type: ignore[no-any-return]

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
        """Poll until the job finishes and return it; `on_update` sees each reading."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} is still {job['state']} after {timeout_s}s")
            time.sleep(poll_s)

    def download_output(
        self,
        job_id: str,
        dest: Path | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        errors: bool = False,
    ) -> Path:
        """Save the job's output file (or with `errors`, its error file: the rows that could
        not be scored) to `dest` (a file, or a folder to keep the server's file name in;
        default: the current folder); returns the path written."""
        which = "errors" if errors else "output"
        response = self._request("GET", f"/jobs/{job_id}/{which}", stream=True)
        with response:
            name = _filename(response.headers.get("Content-Disposition", "")) or f"{job_id}.out"
            target = dest or Path.cwd()
            if target.is_dir():
                target = target / name
            total = response.headers.get("Content-Length")
            done = 0
            partial = target.with_name(f".{target.name}.part")
            with partial.open("wb") as out:
                for chunk in response.iter_content(_CHUNK):
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
            return self._json(
                "POST", "/datasets", data=monitor, headers={"Content-Type": monitor.content_type}
            )

    def datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/datasets")["datasets"]  # type: ignore[no-any-return]

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/datasets/{dataset_id}")

    # Models

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/models")["models"]  # type: ignore[no-any-return]

    def model(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/models/{name}")

    def model_version(self, name: str, version: str | int = "latest") -> dict[str, Any]:
        """A version by number, alias (production) or `latest`."""
        return self._json("GET", f"/models/{name}/versions/{version}")

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
            return self._json(
                "POST",
                f"/models/{name}/versions",
                data=monitor,
                headers={"Content-Type": monitor.content_type},
            )

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """Point `alias` at a version (needs a server with PUT /models/<name>/aliases/<alias>)."""
        return self._json("PUT", f"/models/{name}/aliases/{alias}", json={"version": version})

    # Keys (admin)

    def create_key(self, owner: str, role: str = "user") -> dict[str, Any]:
        """A new key; its `key` field is the secret, shown this once."""
        return self._json("POST", "/keys", json={"owner": owner, "role": role})

    def keys(self) -> list[dict[str, Any]]:
        return self._json("GET", "/keys")["keys"]  # type: ignore[no-any-return]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/keys/{key_id}")

    # Plumbing

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        # Parsed JSON is Any to mypy; this method and the ones that return a part of its
        # answer (`type: ignore[no-any-return]`) promise the shapes the API documents.
        return self._request(method, path, **kwargs).json()  # type: ignore[no-any-return]

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.url}/api/v1{path}"
        try:
            response = self.http.request(method, url, timeout=self.timeout_s, **kwargs)
        except requests.ConnectionError as exc:
            raise ConnectionFailed(f"cannot reach Kiln at {self.url}: {exc}") from None
        except requests.Timeout:
            raise ConnectionFailed(f"Kiln at {self.url} did not answer in time") from None
        except requests.exceptions.InvalidJSONError:
            raise InvalidInput("JSON has no NaN or infinity: send finite numbers") from None
        if response.status_code >= 400:
            raise _api_error(response)
        return response


def _api_error(response: requests.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    status = response.status_code
    code = str(body.get("code") or f"http_{status}")
    detail = str(body.get("detail") or response.reason or "error")
    errors = body.get("errors") if isinstance(body.get("errors"), list) else []
    kind = NotFoundError if status == 404 else AuthError if status in (401, 403) else ApiError
    return kind(status, code, detail, errors)


def _filename(disposition: str) -> str | None:
    """The file name a Content-Disposition header offers, stripped of any folder part."""
    match = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", disposition)
    if not match:
        return None
    name = Path(unquote(match.group(1))).name
    return name or None
