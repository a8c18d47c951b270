"""Sharded jobs: a parent job whose rows are scored by child jobs (its shards).

The parent's first attempt plans the split and calls `fan_out`: in one transaction the
children are inserted (queued, each with its row range) and the parent becomes a job
awaiting its shards (`running`, no attempt alive, no worker held). The children's messages
go out after the commit, through the one send path; a child whose send failed is queued
with no `sent_at`, which the reconciler resends like any other.

Each child is an ordinary job: its own attempts, retries and resume. When one ends, its
worker calls `settle` for the parent (and the reconciler calls it for every waiting parent,
which repairs a parent whose last child's worker died before settling it):
- a shard failed → the parent fails with its reason and the other shards are cancelled;
- a shard was cancelled (by its user) → the parent is cancelled, and the other shards;
- every shard succeeded → the parent is queued again and sent: its next attempt assembles
  the shards' outputs in input order;
- otherwise the parent's progress line is brought up to date.
Each move is a compare-and-set on the parent still awaiting its shards, so two children
settling at once (or a child and the reconciler) move it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import jobs, submission
from db.base import utcnow
from db.models import Job
from kiln.broker import Sender
from kiln.states import JobState


def fan_out(
    session: Session,
    parent: Job,
    attempt: int,
    spec: dict[str, Any],
    ranges: list[tuple[int, int]],
) -> list[Job] | None:
    """Insert one queued child per row range (rows [start, stop) of the dataset), with
    `spec`, and move the parent's attempt to awaiting them; flushed, not committed. None
    if the attempt lost the job or a cancel (or a preemption) was requested meanwhile."""
    message = f"waiting for {len(ranges)} shards"
    if not jobs.await_shards(session, parent.id, attempt, len(ranges), message):
        return None
    children = []
    for index, (start, stop) in enumerate(ranges):
        child = jobs.create(
            session,
            kind=parent.kind,
            owner=parent.owner,
            spec=spec,
            queue=parent.queue,
            priority=parent.priority,
            preemptible=parent.preemptible,
        )
        child.parent_id, child.shard_index = parent.id, index
        child.row_start, child.row_stop = start, stop
        children.append(child)
    session.flush()
    return children


def children(session: Session, parent_id: str) -> list[Job]:
    """The parent's shards, in shard order."""
    return list(
        session.scalars(select(Job).where(Job.parent_id == parent_id).order_by(Job.shard_index))
    )


def settle(session: Session, send: Sender, parent_id: str) -> str | None:
    """Move a parent awaiting its shards on, from how they stand (see the module's doc);
    commits. What happened: "failed", "cancelled", "assembling", or None (still waiting,
    or the parent was not waiting)."""
    parent = session.get(Job, parent_id)
    if parent is None or not parent.awaiting_shards or parent.state != JobState.RUNNING:
        return None
    shards = children(session, parent_id)
    failed = next((c for c in shards if c.state == JobState.FAILED), None)
    cancelled = next((c for c in shards if c.state == JobState.CANCELLED), None)
    outcome: str | None = None
    if failed is not None:
        reason = f"shard {failed.shard_index} (job {failed.id}) failed: {failed.error_message}"
        if jobs.end_awaiting(session, parent_id, JobState.FAILED, reason, "ShardFailed"):
            jobs.log(session, parent_id, f"failed: {reason}", "error")
            jobs.cancel_shards(session, parent_id)
            outcome = "failed"
    elif cancelled is not None:
        reason = f"cancelled: shard {cancelled.shard_index} (job {cancelled.id}) was cancelled"
        if jobs.end_awaiting(session, parent_id, JobState.CANCELLED, reason):
            jobs.log(session, parent_id, reason, "warning")
            jobs.cancel_shards(session, parent_id)
            outcome = "cancelled"
    elif len(shards) == parent.shard_count and all(c.state == JobState.SUCCEEDED for c in shards):
        if jobs.wake_to_assemble(session, parent_id, f"assembling {len(shards)} shards"):
            jobs.log(session, parent_id, f"all {len(shards)} shards succeeded; assembling")
            submission.commit_and_send(session, send, parent)
            return "assembling"
    else:
        combined = summary(parent, shards)
        jobs.report_shards(session, parent_id, combined.progress, combined.message)
    session.commit()
    return outcome


def awaiting(session: Session) -> list[str]:
    """Every parent awaiting its shards (the reconciler settles each)."""
    return list(
        session.scalars(
            select(Job.id).where(Job.state == JobState.RUNNING, Job.awaiting_shards.is_(True))
        )
    )


@dataclass(frozen=True)
class ShardView:
    id: str
    index: int
    state: str
    rows: int
    rows_done: int


@dataclass(frozen=True)
class Summary:
    """What a parent shows of its shards: each one, and their combined progress."""

    shards: list[ShardView]
    rows: int
    rows_done: int
    rows_per_s: float | None
    eta_s: float | None

    @property
    def progress(self) -> float:
        return self.rows_done / self.rows if self.rows else 0.0

    @property
    def message(self) -> str:
        finished = sum(1 for s in self.shards if s.state == JobState.SUCCEEDED)
        line = f"{finished}/{len(self.shards)} shards done, {self.rows_done}/{self.rows} rows"
        if self.rows_per_s:
            line += f", {self.rows_per_s:,.0f} rows/s"
        if self.eta_s is not None:
            line += f", about {self.eta_s:.0f}s left"
        return line


def summary(parent: Job, shards: list[Job], now: datetime | None = None) -> Summary:
    """The shards' combined progress: rows done (each shard's progress times its rows), and
    rows/s since the parent split (when its shards were created) until now, or until the
    last shard ended once all have, with the time left."""
    views = []
    for child in shards:
        rows = (child.row_stop or 0) - (child.row_start or 0)
        done = rows if child.state == JobState.SUCCEEDED else round(child.progress * rows)
        views.append(ShardView(child.id, child.shard_index or 0, child.state, rows, done))
    rows = sum(v.rows for v in views)
    rows_done = sum(v.rows_done for v in views)
    rate: float | None = None
    eta: float | None = None
    if shards:
        split_at = min(child.created_at for child in shards)
        ended = [child.finished_at for child in shards if child.finished_at is not None]
        until = max(ended) if len(ended) == len(shards) else (now or utcnow())
        elapsed = (until - split_at).total_seconds()
        if elapsed > 0 and rows_done:
            rate = rows_done / elapsed
            eta = (rows - rows_done) / rate if rows_done < rows else None
    return Summary(views, rows, rows_done, rate, eta)
