"""Process logging: one JSON object a line (or plain text on a terminal), and the job that a
line belongs to on every line a worker writes while it runs that job.

`job_fields(...)` binds job_id, kind, attempt, worker and device in a contextvar for the
duration of one attempt; JobContextFilter copies them onto every record, so library code
logging through any logger is tagged without knowing about jobs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

#: The fields every job-work line carries (None outside a job).
JOB_FIELDS = ("job_id", "kind", "attempt", "worker", "device")

_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "kiln_job", default=None
)
#: Marks the handler configure() installed, so configuring twice replaces it.
_HANDLER_NAME = "kiln"


@contextmanager
def job_fields(**fields: Any) -> Iterator[None]:
    """Tag every log record made in this context (this thread or task) with `fields`."""
    token = _job.set({**(_job.get() or {}), **fields})
    try:
        yield
    finally:
        _job.reset(token)


class JobContextFilter(logging.Filter):
    """Copies the bound job fields onto each record (None for the ones not bound)."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _job.get() or {}
        for name in JOB_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, bound.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human lines; a job's lines end with its id, kind and attempt."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = [
            f"{name}={value}"
            for name in JOB_FIELDS
            if (value := getattr(record, name, None)) is not None
        ]
        return f"{line} [{' '.join(tags)}]" if tags else line


def use_json(log_format: str, stream: IO[str]) -> bool:
    """json and text are what they say; auto is JSON unless a person watches a terminal."""
    if log_format == "auto":
        return not (hasattr(stream, "isatty") and stream.isatty())
    return log_format == "json"


def configure(
    log_format: str = "auto", level: int = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the root logger's records to `stream` (stderr) in the chosen format."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if use_json(log_format, stream) else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (a library's DeprecationWarning, Celery's SecurityWarning) would be
    # printed as text; as records of the `py.warnings` logger they get this format too.
    logging.captureWarnings(True)
    return handler
