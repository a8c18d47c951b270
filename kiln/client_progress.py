"""The wait display that `kiln wait` and a job handle's `.wait()` draw on stderr (rich):
the job id, a bar and the percentage at any terminal width, then the state, the job's
message and its latest metrics, cut with an ellipsis where the line would not fit."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kiln.states import JobState

#: Shows one reading of a job, with its latest metrics as text ("" when none).
ShowReading = Callable[[dict[str, Any], str], None]


def wanted(progress: bool | None) -> bool:
    """Draw the bar? `None` means: when stderr is a terminal (not in a log file or a pipe)."""
    return sys.stderr.isatty() if progress is None else progress


def needs_metrics(job: dict[str, Any]) -> bool:
    """A queued job has no metrics yet: the display asks for them once it runs."""
    return bool(job["state"] != JobState.QUEUED)


@contextmanager
def wait_bar(job_id: str, enabled: bool = True) -> Iterator[ShowReading]:
    """A display for one job's readings; with `enabled` False, one that shows nothing."""
    if not enabled:
        yield lambda job, latest: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
    from rich.table import Column

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=12)),
        BarColumn(bar_width=max(10, min(40, console.width // 5))),
        TaskProgressColumn(table_column=Column(no_wrap=True, min_width=4, justify="right")),
        TextColumn(
            "{task.fields[status]}",
            table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"),
        ),
        console=console,
        expand=True,
    )
    with progress:
        bar = progress.add_task(job_id[:12], total=1.0, status="")

        def show(job: dict[str, Any], latest: str) -> None:
            progress.update(bar, completed=job["progress"], status=status_line(job, latest))

        yield show


def status_line(job: dict[str, Any], latest: str = "") -> str:
    """The state, its latest metrics, its place in the queue and the job's message, each
    said once: a finished job's message is often its state again ("succeeded"). The
    metrics come before the message, so a narrow terminal, which cuts the line's end,
    still shows them."""
    message = "" if repeats_state(job) else job.get("message") or ""
    return " ".join(filter(None, [job["state"], latest, queue_standing(job), message]))


def queue_standing(job: dict[str, Any]) -> str:
    """A queued job's place and estimated start ("3rd in queue gpu, starts in about 2 min");
    empty for any other job."""
    position = job.get("queue_position")
    if job.get("state") != JobState.QUEUED or position is None:
        return ""
    line = f"position {position} in queue {job.get('queue', '')}".rstrip()
    start = job.get("estimated_start_at")
    if start:
        from datetime import UTC, datetime

        wait_s = (datetime.fromisoformat(start) - datetime.now(UTC)).total_seconds()
        line += ", starts in about " + _duration(wait_s) if wait_s > 1 else ", starts soon"
    return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def repeats_state(job: dict[str, Any]) -> bool:
    return bool(str(job.get("message") or "").strip().lower() == str(job["state"]))


#: The metrics a person waits on, first (the wait line is cut at the terminal's width);
#: any others follow in name order.
HEADLINE_METRICS = (
    "val_accuracy",
    "val_loss",
    "train_loss",
    "accuracy",
    "loss",
    "val_mae",
    "val_f1",
)


def latest_metrics(series: dict[str, list[dict[str, Any]]]) -> str:
    """Each metric's newest value, `name=value` separated by spaces, headline ones first."""

    def rank(name: str) -> tuple[int, str]:
        headline = name in HEADLINE_METRICS
        return (HEADLINE_METRICS.index(name) if headline else len(HEADLINE_METRICS), name)

    return " ".join(
        f"{name}={series[name][-1]['value']:.4g}"
        for name in sorted(series, key=rank)
        if series[name]
    )
