"""Job, JobEvent and Metric: a job's row, its log lines and its metric series."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false as sa_false
from sqlalchemy.sql.expression import true as sa_true

from db.base import Base, UTCDateTime, new_id, utcnow
from kiln.states import JobState


def _sql_list(states: list[JobState]) -> str:
    return ", ".join(f"'{state.value}'" for state in states)


#: The CHECKs below, written from kiln.states (the same text the migrations created).
_KNOWN = _sql_list(list(JobState))
_TERMINAL = _sql_list([state for state in JobState if state.is_terminal])


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            f"state IN ({_KNOWN})",
            name="state_known",
        ),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_in_unit_range"),
        # A finished job says when it finished; a failed one says why.
        CheckConstraint(
            f"state NOT IN ({_TERMINAL}) OR finished_at IS NOT NULL",
            name="terminal_has_finished_at",
        ),
        CheckConstraint(
            f"state != '{JobState.FAILED.value}' OR error_type IS NOT NULL", name="failed_has_error"
        ),
        UniqueConstraint("owner", "idempotency_key"),
        # A waiting job is named by at most one victim: two deciders never preempt twice
        # for it (workers/preempt.py).
        UniqueConstraint("preempt_for", name="uq_jobs_preempt_for"),
        Index("ix_jobs_owner_created", "owner", "created_at"),
        Index("ix_jobs_state_heartbeat", "state", "heartbeat_at"),
        # The sweeper's question: finished jobs not yet expired whose time has come.
        Index("ix_jobs_expired_expires", "expired_at", "expires_at"),
        # The scheduler's sweep of queued jobs whose deadline passed (db.deadlines).
        Index("ix_jobs_state_deadline", "state", "deadline_at"),
        # Recent durations of a kind on a queue, for a queued job's estimated start
        # (db.queue_estimate): newest finished first, bounded by a LIMIT.
        Index("ix_jobs_queue_kind_state_finished", "queue", "kind", "state", "finished_at"),
        Index("ix_jobs_parent_id", "parent_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    owner: Mapped[str] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: Celery queue the job is sent to (decided by kiln.routing at submit time).
    queue: Mapped[str] = mapped_column(String(32))
    #: Bumped by each claim; every later write by a worker names the attempt it holds.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    #: Attempts ended by a graceful worker shutdown (SIGTERM), or by a sharded job handing
    #: its rows to its shards (db.shards). They are not the job's fault,
    #: so max_attempts counts `attempt - shutdown_attempts`; `attempt` itself only grows,
    #: because it is the fencing token every worker write is checked against.
    shutdown_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Attempts ended by a RetryableOOM; runners shrink their batch by this many halvings.
    oom_retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The scheduler may stop this running job for a waiting one of higher priority
    #: (preemption); false opts out.
    preemptible: Mapped[bool] = mapped_column(default=True, server_default=sa_true())
    #: Times this job went back to the queue for a job of higher priority (not charged as
    #: attempts); past KILN_MAX_PREEMPTIONS it is no longer preempted.
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Set on a running job asked to stop for the waiting job it names; cleared when it
    #: re-queues, or when that job no longer waits.
    preempt_for: Mapped[str | None] = mapped_column(String(32))
    #: When the latest message for the current attempt was sent (or will be delivered, for a
    #: delayed retry); None while the first send has not happened. The reconciler resends a
    #: queued job whose message is older than a grace period and absent from the broker.
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(32))
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The user's deadline in seconds from submission (POST /jobs `deadline_s`); None: none.
    deadline_s: Mapped[float | None] = mapped_column(Float)
    #: created_at + deadline_s: past it a queued job is cancelled and a running one stops.
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    #: sha256 of the canonical submission body sent with the Idempotency-Key.
    idempotency_fingerprint: Mapped[str | None] = mapped_column(String(64))
    #: Where the job's events are POSTed (docs/webhooks.md), and which events; None: none.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: How long after it finishes the job keeps its output files and log lines, in seconds:
    #: the submission's `expires_after`, else KILN_RETENTION_DAYS when it was submitted.
    #: None (jobs from before retention, or made without it): the sweeper's current default.
    expires_after_s: Mapped[int | None] = mapped_column(Integer)
    #: finished_at + expires_after_s, written with the finishing state (db.jobs._cas).
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When the sweeper removed the job's outputs, log lines and scratch; the row stays as
    #: the record of what ran (spec, result, error, metrics).
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def expired(self) -> bool:
        return self.expired_at is not None

    #: The job's tags (key → value), loaded when first read; written once, at submission.
    tag_rows: Mapped[list[JobTag]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="JobTag.key"
    )

    @property
    def tags(self) -> dict[str, str]:
        """The tags as the API shows them."""
        return {row.key: row.value for row in self.tag_rows}

    # Sharded batch jobs (workers/runners/batch_shards.py, db/shards.py). A parent splits its
    # rows into child jobs; each child scores rows [row_start, row_stop) of the dataset.
    #: The sharded job this one scores a part of (None: an ordinary job).
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    #: This child's place among its parent's shards, from 0 (its output's place too).
    shard_index: Mapped[int | None] = mapped_column(Integer)
    row_start: Mapped[int | None] = mapped_column(BigInteger)
    row_stop: Mapped[int | None] = mapped_column(BigInteger)
    #: Of a parent: how many children it split into (None until it did).
    shard_count: Mapped[int | None] = mapped_column(Integer)
    #: A parent whose shards run: `running` with no attempt of its own (no worker, no
    #: heartbeat; the reconciler does not count it as stalled) until its last child ends
    #: and db.shards.settle re-queues it to assemble, or ends it.
    awaiting_shards: Mapped[bool] = mapped_column(default=False, server_default=sa_false())

    @property
    def charged_attempts(self) -> int:
        """Attempts that count against max_attempts (graceful shutdowns do not)."""
        return self.attempt - self.shutdown_attempts

    @property
    def error(self) -> dict[str, str] | None:
        """Why the job failed, as the API shows it."""
        if self.error_type is None:
            return None
        return {"type": self.error_type, "message": self.error_message or ""}


class JobTag(Base):
    """One key-value tag of a job (team=nlp): a table of its own, so that a filter on
    (key, value) is an indexed lookup on SQLite and PostgreSQL alike."""

    __tablename__ = "job_tags"
    __table_args__ = (Index("ix_job_tags_key_value", "key", "value"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))


class JobEvent(Base):
    """One log line of a job, as the user reads it."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)


class Metric(Base):
    """One point of a metric series (train_loss at epoch 3, say)."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "name", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
