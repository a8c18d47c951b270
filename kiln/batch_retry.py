"""batch_predict's `retry_of`: which earlier job a retry may name (checked by the web at
submission, 422, and by the worker again before it scores, JobFailure)."""

from __future__ import annotations

from typing import Any


def why_not_retryable(
    job_id: str, kind: str, state: str, result: dict[str, Any] | None
) -> str | None:
    """Why job `job_id` cannot be the source of a retry, or None if it can: it must be a
    batch_predict that succeeded with an output and an error file (rows to retry)."""
    if kind != "batch_predict":
        return f"job {job_id} is of kind {kind}; retry_of names a batch_predict job"
    if state != "succeeded":
        return f"job {job_id} is {state}; retry_of needs a batch_predict job that succeeded"
    if not (result or {}).get("output"):
        return f"job {job_id} has no output file to merge into"
    if not (result or {}).get("error_file"):
        return f"job {job_id} has no error file: every row was scored, nothing to retry"
    return None
