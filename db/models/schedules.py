"""Schedule: a cron expression that submits a job from a stored template (an overnight run)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, UTCDateTime, new_id, utcnow


class Schedule(Base):
    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_enabled_next_run_at", "enabled", "next_run_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(100))
    #: Five-field cron expression, evaluated in UTC.
    cron: Mapped[str] = mapped_column(String(100))
    #: The job template: kind, its validated spec, priority.
    kind: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: The template's webhook (its jobs get these), or None.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)
    #: The tags and deadline_s each job it submits carries (as POST /jobs takes them).
    tags: Mapped[dict[str, str] | None] = mapped_column(JSON)
    deadline_s: Mapped[float | None] = mapped_column(Float)
    #: Seconds each job it submits keeps its outputs and log lines (POST /jobs'
    #: expires_after); None: KILN_RETENTION_DAYS.
    expires_after_s: Mapped[int | None] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(default=True)
    #: When the schedule fires next; moved forward (compare-and-set) each time it fires.
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
