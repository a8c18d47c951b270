"""What a job's live stream reads: one cursor over its state, progress, metric points and
log lines, and the reads that move it forward.

A job's history is in three places: log lines (`job_events`) and metric points (`metrics`)
are rows with increasing ids, while state and progress are columns of the job row, the
latest value only. So the cursor is composite: the last log line id and the last metric
point id seen, plus the job-row snapshot seen (attempt, state, progress, a checksum of the
status line). A reader that resumes from a cursor gets exactly the rows after those ids,
and a state or progress event only where the snapshot differs from the one it saw.

The ids of one job increase in commit order because one writer at a time reports for a
job (the worker holding the attempt). The job row is read before the rows, so when a
reader sees a terminal state it already has every line and point committed with it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Job, JobEvent, Metric
from kiln.errors import InvalidRequest
from kiln.states import JobState

#: Rows of each kind one read returns at most; a reader behind by more reads again.
PAGE = 1000


@dataclass(frozen=True)
class Snapshot:
    """The job-row fields a stream reports."""

    state: str
    attempt: int
    progress: float
    message: str
    error_type: str | None
    error_message: str | None
    heartbeat_at: datetime | None
    finished_at: datetime | None

    @property
    def terminal(self) -> bool:
        return JobState(self.state).is_terminal

    @property
    def state_key(self) -> tuple[int, str]:
        return (self.attempt, self.state)

    @property
    def progress_key(self) -> tuple[int, int]:
        return (round(self.progress * 10_000), zlib.crc32(self.message.encode()))


@dataclass(frozen=True)
class Cursor:
    """Where a reader stands. `state` and `progress` are the keys of the snapshot it was
    last told about (None: not told yet)."""

    log_id: int = 0
    metric_id: int = 0
    state: tuple[int, str] | None = None
    progress: tuple[int, int] | None = None

    def encode(self) -> str:
        """The event id sent to clients (opaque to them): log.metric[.attempt.state.p.crc]."""
        parts = [str(self.log_id), str(self.metric_id)]
        if self.state is not None and self.progress is not None:
            parts += [str(self.state[0]), self.state[1], str(self.progress[0])]
            parts.append(format(self.progress[1], "x"))
        return ".".join(parts)

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """A cursor from an event id this API sent, or from a plain log line id (the
        `/events` cursor: metric points and the state are then sent from the start)."""
        parts = text.strip().split(".")
        try:
            if len(parts) == 1:
                return cls(log_id=_non_negative(parts[0]))
            if len(parts) == 2:
                return cls(_non_negative(parts[0]), _non_negative(parts[1]))
            if len(parts) == 6 and parts[3] in {s.value for s in JobState}:
                log_id, metric_id, attempt = (_non_negative(p) for p in parts[:3])
                crc = int(parts[5], 16)
                if not 0 <= crc < 2**32:
                    raise ValueError
                state = (attempt, parts[3])
                return cls(log_id, metric_id, state, (_non_negative(parts[4]), crc))
        except ValueError:
            pass
        raise InvalidRequest("the stream cursor (Last-Event-ID or after) is not one this API sent")

    def covers(self, other: Cursor) -> bool:
        """Whether this cursor is at or past `other`'s rows."""
        return self.log_id >= other.log_id and self.metric_id >= other.metric_id


def _non_negative(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise ValueError
    return int(text)


@dataclass(frozen=True)
class Item:
    """One event for a stream: its type, its JSON data, and the cursor right after it."""

    type: str
    data: dict[str, Any]
    cursor: Cursor


@dataclass(frozen=True)
class Delta:
    """What a read found after a cursor: the job's snapshot (read first), then rows."""

    snapshot: Snapshot
    logs: list[JobEvent]
    metrics: list[Metric]

    @property
    def complete(self) -> bool:
        """False when a page filled up: more rows wait, so the snapshot must wait too."""
        return len(self.logs) < PAGE and len(self.metrics) < PAGE


def snapshot_of(job: Job) -> Snapshot:
    return Snapshot(
        state=str(job.state),
        attempt=job.attempt,
        progress=job.progress,
        message=job.message,
        error_type=job.error_type,
        error_message=job.error_message,
        heartbeat_at=job.heartbeat_at,
        finished_at=job.finished_at,
    )


def read_after(session: Session, job_id: str, cursor: Cursor) -> Delta | None:
    """The job's snapshot, then up to PAGE log lines and metric points after `cursor`
    (None if the job is gone). The job row is read first; see the module's docstring."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    snapshot = snapshot_of(job)
    logs = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.id > cursor.log_id)
        .order_by(JobEvent.id)
        .limit(PAGE)
    )
    metrics = session.scalars(
        select(Metric)
        .where(Metric.job_id == job_id, Metric.id > cursor.metric_id)
        .order_by(Metric.id)
        .limit(PAGE)
    )
    return Delta(snapshot, list(logs), list(metrics))


#: A job row's fields that a stream reports: (attempt, state, progress, message).
Head = tuple[int, str, float, str]


def latest_ids(session: Session, job_ids: Iterable[str]) -> dict[str, tuple[int, int, Head]]:
    """For each job: its newest log line id, its newest metric point id and its row's
    (attempt, state, progress, message), in three queries whatever the number of jobs:
    what tells a stream hub which jobs moved since it last looked."""
    ids = list(job_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.attempt, Job.state, Job.progress, Job.message).where(Job.id.in_(ids))
    )
    heads: dict[str, Head] = {
        row.id: (row.attempt, str(row.state), row.progress, row.message) for row in rows
    }
    logs: dict[str, int] = {
        job_id: newest
        for job_id, newest in session.execute(
            select(JobEvent.job_id, func.max(JobEvent.id))
            .where(JobEvent.job_id.in_(ids))
            .group_by(JobEvent.job_id)
        )
    }
    metrics: dict[str, int] = {
        job_id: newest
        for job_id, newest in session.execute(
            select(Metric.job_id, func.max(Metric.id))
            .where(Metric.job_id.in_(ids))
            .group_by(Metric.job_id)
        )
    }
    return {
        job_id: (logs.get(job_id) or 0, metrics.get(job_id) or 0, head)
        for job_id, head in heads.items()
    }


def items(delta: Delta, cursor: Cursor) -> list[Item]:
    """The events a reader at `cursor` is owed from `delta`: log lines and metric points,
    each kind in id order (the cursor only moves forward), the two interleaved by time;
    then a state or progress event where the snapshot moved. The snapshot is held back
    while rows remain unread (an incomplete delta)."""
    logs = [line for line in delta.logs if line.id > cursor.log_id]
    points = [point for point in delta.metrics if point.id > cursor.metric_id]
    found: list[Item] = []
    while logs or points:
        # A re-reported step keeps its id but takes a newer `at`: compare the heads only.
        if logs and (not points or logs[0].at <= points[0].at):
            line = logs.pop(0)
            cursor = replace(cursor, log_id=line.id)
            data = {"id": line.id, "at": _iso(line.at), "level": line.level}
            found.append(Item("log", {**data, "message": line.message}, cursor))
        else:
            point = points.pop(0)
            cursor = replace(cursor, metric_id=point.id)
            data = {"id": point.id, "at": _iso(point.at), "name": point.name}
            found.append(Item("metric", {**data, "step": point.step, "value": point.value}, cursor))
    if delta.complete:
        found += snapshot_items(delta.snapshot, cursor)
    return found


def snapshot_items(snapshot: Snapshot, cursor: Cursor) -> list[Item]:
    """A state event if the state or attempt moved (it carries the progress and status
    line too), else a progress event if those moved, else nothing."""
    at = _iso(snapshot.finished_at or snapshot.heartbeat_at)
    if cursor.state == snapshot.state_key and cursor.progress == snapshot.progress_key:
        return []
    moved = replace(cursor, state=snapshot.state_key, progress=snapshot.progress_key)
    if cursor.state != snapshot.state_key:
        return [Item("state", _state_data(snapshot, at), moved)]
    data = {"progress": snapshot.progress, "message": snapshot.message, "at": at}
    return [Item("progress", data, moved)]


def _state_data(snapshot: Snapshot, at: str | None) -> dict[str, Any]:
    error = None
    if snapshot.error_type is not None:
        error = {"type": snapshot.error_type, "message": snapshot.error_message or ""}
    return {
        "state": snapshot.state,
        "attempt": snapshot.attempt,
        "progress": snapshot.progress,
        "message": snapshot.message,
        "error": error,
        "at": at,
    }


@overload
def _iso(when: datetime) -> str: ...
@overload
def _iso(when: None) -> None: ...
def _iso(when: datetime | None) -> str | None:
    """A time as the API's JSON writes it (pydantic): UTC with a `Z`, so a stream's log
    line reads exactly as the same line from /events."""
    if when is None:
        return None
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
