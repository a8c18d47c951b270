"""The scheduler process: fires due cron schedules, decides preemptions (workers/preempt.py)
and reconciles the database and the broker.

tick() is the decision, a pure function of (schedules, now); fire_due() applies it to the
database (a compare-and-set per schedule, so two schedulers never fire one slot twice) and
sends each new job after its row is committed, as POST /jobs does.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Protocol

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db import schedules as schedule_rows
from db.base import utcnow
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Job
from kiln.broker import make_celery, send_run, waiting_messages
from kiln.errors import KilnError
from kiln.settings import Settings
from workers import preempt
from workers.reconcile import Report, reconcile

log = logging.getLogger(__name__)

#: How often due schedules are looked for (cron's resolution is a minute).
SCHEDULE_TICK_S = 5.0


class ScheduleState(Protocol):
    id: str
    cron: str
    enabled: bool
    next_run_at: datetime


@dataclass(frozen=True)
class Firing:
    schedule_id: str
    #: The slot being fired (the schedule's next_run_at when it was read).
    was_due: datetime
    #: The first slot after now: every slot missed before now is skipped, not replayed.
    next_run_at: datetime


def tick(schedules: Iterable[ScheduleState], now: datetime) -> list[Firing]:
    """The schedules that fire at `now`: each enabled one whose next run is not after now,
    once, however many of its slots passed while no scheduler ran."""
    return [
        Firing(s.id, s.next_run_at, schedule_rows.next_after(s.cron, now))
        for s in schedules
        if s.enabled and s.next_run_at <= now
    ]


def fire_due(
    sessions: sessionmaker[Session], send: Callable[[Job], None], now: datetime | None = None
) -> list[Job]:
    """Fire every due schedule once; returns the jobs created (and sent)."""
    now = now or utcnow()
    with session_scope(sessions) as session:
        rows = {s.id: s for s in schedule_rows.due(session, now)}
        firings = tick(rows.values(), now)
    created = []
    for firing in firings:
        try:
            with session_scope(sessions) as session:
                schedule = rows[firing.schedule_id]
                job = schedule_rows.fire(session, schedule, firing.was_due, firing.next_run_at)
        except KilnError as exc:  # a template that no longer validates; logged, not fatal
            log.error("schedule=%s event=fire_failed error=%s", firing.schedule_id, exc.message)
            continue
        if job is not None:
            log.info("schedule=%s job=%s event=fired", firing.schedule_id, job.id)
            send(job)
            created.append(job)
    return created


def run_forever(settings: Settings, interval_s: float | None = None) -> None:
    """Fire schedules every few seconds and reconcile every `interval_s` (default: a quarter
    of the heartbeat timeout) until SIGTERM or SIGINT."""
    interval = interval_s or max(1.0, settings.heartbeat_timeout_s / 4)
    celery = make_celery(settings)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    def send(job: Job) -> None:
        send_run(celery, job.id, job.attempt, job.queue, job.priority)
        with session_scope(sessions) as session:  # so the reconciler knows it was sent
            jobs.mark_sent(session, job.id, job.attempt)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("event=scheduler_started interval_s=%.1f", interval)
    last_reconcile = time.monotonic()
    while not stop.wait(min(interval, SCHEDULE_TICK_S)):
        try:
            fire_due(sessions, send)
        except Exception:
            log.exception("event=schedules_failed (will retry)")
        try:
            preempt.sweep(sessions, settings)  # decided here only: one process, the db records it
        except Exception:
            log.exception("event=preemption_failed (will retry)")
        if time.monotonic() - last_reconcile < interval:
            continue
        last_reconcile = time.monotonic()
        try:
            report = reconcile_once(celery, sessions, settings)
        except Exception:
            log.exception("event=reconcile_failed (will retry)")
            continue
        if report != Report():
            log.info("event=reconciled %s", report)


def reconcile_once(celery: Celery, sessions: sessionmaker[Session], settings: Settings) -> Report:
    """One reconciling sweep against this broker (the scheduler's loop body; tests call it)."""
    return reconcile(
        sessions,
        settings,
        lambda job: send_run(celery, job.id, job.attempt, job.queue, job.priority),
        lambda queue: waiting_messages(celery, queue),
    )
