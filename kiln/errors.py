"""The KilnError hierarchy: each class declares its HTTP status and machine-readable code."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

#: pydantic's messages reworded where a user deserves plainer words, by error type.
_PLAINER = {"finite_number": "must be a finite number"}


#: What pydantic puts before the message of a ValueError or AssertionError a validator raised.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


class FieldProblem(ValueError):
    """A model-level validator's error that belongs to one field: validation_details puts
    `field` in its loc (pydantic gives a model validator's errors an empty loc)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validation_details(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A pydantic error as the `errors` list of a problem body: where, and what is wrong
    (the one place pydantic's errors are worded for users)."""
    return [_detail(error, prefix) for error in exc.errors()]


def _detail(error: Any, prefix: tuple[str, ...]) -> dict[str, Any]:
    loc = [*prefix, *map(str, error["loc"])]
    raised = (error.get("ctx") or {}).get("error")
    if isinstance(raised, FieldProblem):
        loc.append(raised.field)
    msg = _PLAINER.get(error["type"], error["msg"])
    for noise in _PYDANTIC_PREFIXES:
        msg = msg.removeprefix(noise)
    return {"loc": loc, "msg": msg}


def summary(details: list[dict[str, Any]]) -> str:
    """A problem's one-line detail from its first error: `loc: msg`, or `msg` alone when
    it has no loc."""
    if not details:
        return "invalid"
    first = details[0]
    return f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])


class KilnError(Exception):
    """Base of every error Kiln reports to a user."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidRequest(KilnError):
    status, code = 400, "invalid_request"


class InvalidSpec(KilnError):
    status, code = 422, "invalid_spec"


class Unauthorized(KilnError):
    status, code = 401, "unauthorized"


class Forbidden(KilnError):
    status, code = 403, "forbidden"


class NotFound(KilnError):
    status, code = 404, "not_found"


class NoOutput(NotFound):
    """The job exists but has no such file (yet, or at all)."""

    code = "no_output"


class WebhookRefused(KilnError):
    """A webhook_url that may not be requested: not http(s), unresolvable, or an address
    the operator's policy refuses (private, loopback, link-local…)."""

    status, code = 422, "webhook_url_refused"


class QueueQuotaExceeded(KilnError):
    """The owner already has max_queued_per_owner jobs waiting (API jobs and schedules)."""

    status, code = 429, "queue_quota_exceeded"


class BrokerUnavailable(KilnError):
    """Redis (the broker, where workers announce themselves) did not answer."""

    status, code = 503, "broker_unavailable"


class IllegalTransition(KilnError):
    status, code = 409, "illegal_transition"


class InUse(KilnError):
    """A delete refused because something still refers to the thing (an alias, a model)."""

    status, code = 409, "in_use"


class ExportMissing(KilnError):
    status, code = 404, "export_missing"


class UnsafeModelFile(KilnError):
    """An upload that is (or hides) a pickle or zip archive: Kiln only loads safetensors."""

    status, code = 415, "unsafe_model_file"


class InvalidModelFile(KilnError):
    status, code = 422, "invalid_model_file"


class PayloadTooLarge(KilnError):
    status, code = 413, "payload_too_large"


class UnsupportedDataset(KilnError):
    status, code = 422, "unsupported_dataset"


class JobFailure(Exception):
    """Raised inside a runner for a failure the user caused: the job fails, no retry."""


class TooManyStreams(KilnError):
    """The API key already has streams_per_key live job streams open."""

    status, code = 429, "too_many_streams"


class StreamsBusy(KilnError):
    """This web process holds as many live streams as it has threads set aside for them."""

    status, code = 503, "streams_busy"
