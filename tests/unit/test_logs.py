"""kiln.logs: JSON lines, and the job an attempt runs on every line logged while it runs."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from kiln import logs


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    """A root handler in JSON writing to a buffer; the previous handlers come back after."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.configure("json", stream=stream)
    yield stream, logging.getLogger("kiln.test")
    root.handlers[:] = before
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_inside_a_job_carry_its_fields_and_lines_outside_do_not(captured) -> None:
    stream, log = captured
    with logs.job_fields(job_id="j1", kind="train", attempt=2, worker="gpu0@h", device="cuda:0"):
        log.info("epoch %d done", 3)
    log.info("idle")
    inside, outside = lines(stream)
    assert inside["msg"] == "epoch 3 done"
    assert inside["level"] == "info"
    assert inside["logger"] == "kiln.test"
    assert {k: inside[k] for k in logs.JOB_FIELDS} == {
        "job_id": "j1", "kind": "train", "attempt": 2, "worker": "gpu0@h", "device": "cuda:0",
    }  # fmt: skip
    assert not set(logs.JOB_FIELDS) & set(outside)


def test_nested_contexts_add_fields_and_restore_on_exit(captured) -> None:
    stream, log = captured
    with logs.job_fields(job_id="j1"):
        with logs.job_fields(kind="predict"):
            log.info("inner")
        log.info("outer")
    inner, outer = lines(stream)
    assert (inner["job_id"], inner["kind"]) == ("j1", "predict")
    assert outer["job_id"] == "j1"
    assert "kind" not in outer


def test_exceptions_are_one_json_line(captured) -> None:
    stream, log = captured
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it broke")
    (entry,) = lines(stream)
    assert "ValueError: boom" in entry["exc"]


def test_configuring_twice_keeps_one_handler(captured) -> None:
    stream, log = captured
    logs.configure("json", stream=stream)
    log.info("once")
    assert len(lines(stream)) == 1


def test_python_warnings_are_json_lines_too(captured) -> None:
    """Celery's SecurityWarning (a worker run as root) and the like, not printed as text."""
    stream, _ = captured
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning(UserWarning("running as root"), UserWarning, "celery.py", 893)
    (entry,) = lines(stream)
    assert entry["logger"] == "py.warnings"
    assert "UserWarning: running as root" in entry["msg"]


def test_text_format_tags_job_lines() -> None:
    record = logging.LogRecord("w", logging.INFO, __file__, 1, "claimed", None, None)
    with logs.job_fields(job_id="j9", kind="echo"):
        logs.JobContextFilter().filter(record)
    assert logs.TextFormatter().format(record).endswith("claimed [job_id=j9 kind=echo]")


@pytest.mark.parametrize(
    ("setting", "tty", "expected"),
    [("auto", True, False), ("auto", False, True), ("json", True, True), ("text", False, False)],
)
def test_auto_is_json_unless_on_a_terminal(setting: str, tty: bool, expected: bool) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert logs.use_json(setting, Stream()) is expected
