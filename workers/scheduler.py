"""The scheduler process: fires due cron schedules, decides preemptions (workers/preempt.py),
reconciles the database and the broker, and sweeps what retention lets go
(workers/sweeper.py) every KILN_SWEEP_INTERVAL_S.

tick() is the decision, a pure function of (schedules, now); fire_due() applies it to the
database (a compare-and-set per schedule, so two schedulers never fire one slot twice) and
queues and sends each new job by POST /jobs's rules (db.submission): an owner at the queue
quota gets no job for that slot, and the slot is skipped with a log line saying why.

On start the scheduler reconciles at once, resending without a grace period any queued job
whose message was sent before this start and is not in the broker (a restart after the
whole stack was killed recovers in seconds, not after resend_after_s).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Protocol

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from db import schedules as schedule_rows
from db import submission
from db.base import utcnow
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Job, Schedule
from kiln.artifacts import open_store
from kiln.broker import Sender, celery_sender, make_celery, waiting_messages
from kiln.errors import KilnError, QueueQuotaExceeded
from kiln.settings import Settings
from workers import preempt, sweeper
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
    sessions: sessionmaker[Session],
    send: Sender,
    *,
    max_queued: int,
    expires_after_s: int | None = None,
    now: datetime | None = None,
) -> list[Job]:
    """Fire every due schedule once; returns the jobs created (each sent, or left for the
    reconciler to send if the broker refused it). `max_queued` is the per-owner quota,
    `expires_after_s` the retention each job gets (settings.retention_s)."""
    now = now or utcnow()
    with session_scope(sessions) as session:
        rows = {s.id: s for s in schedule_rows.due(session, now)}
        firings = tick(rows.values(), now)
    created = []
    for firing in firings:
        schedule = rows[firing.schedule_id]
        try:
            with session_scope(sessions) as session:
                job = schedule_rows.fire(
                    session,
                    schedule,
                    firing.was_due,
                    firing.next_run_at,
                    max_queued=max_queued,
                    expires_after_s=expires_after_s,
                )
                if job is not None:
                    log.info("schedule=%s job=%s event=fired", schedule.id, job.id)
                    submission.commit_and_send(session, send, job)
                    created.append(job)
        except QueueQuotaExceeded as exc:
            _skip(sessions, schedule, firing, exc)
        except KilnError as exc:  # a template that no longer validates; logged, not fatal
            log.error("schedule=%s event=fire_failed error=%s", schedule.id, exc.message)
    return created


def _skip(
    sessions: sessionmaker[Session], schedule: Schedule, firing: Firing, exc: KilnError
) -> None:
    """Pass over a slot whose owner is at the queue quota: no job, and the next slot is
    waited for (retrying this one would pile up exactly what the quota refuses)."""
    with session_scope(sessions) as session:
        if not schedule_rows.skip(session, schedule, firing.was_due, firing.next_run_at):
            return  # paused, deleted or passed by another scheduler meanwhile
    log.warning(
        "schedule=%s owner=%s event=skipped reason=queue_quota_exceeded slot=%s detail=%s",
        schedule.id,
        schedule.owner,
        firing.was_due.isoformat(),
        exc.message,
    )


def run_forever(settings: Settings, interval_s: float | None = None) -> None:
    """Reconcile at once, then fire schedules every few seconds and reconcile every
    `interval_s` (default: a quarter of the heartbeat timeout) until SIGTERM or SIGINT."""
    interval = interval_s or max(1.0, settings.heartbeat_timeout_s / 4)
    celery = make_celery(settings)
    send = celery_sender(celery)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    started_at = utcnow()
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("event=scheduler_started interval_s=%.1f", interval)
    # The start-up sweep is retried at every tick until it gets through (the broker or
    # the database may still be starting); later sweeps come every `interval`.
    started = _reconcile_logged(celery, sessions, settings, started_at)
    last_reconcile = time.monotonic()
    # The first retention sweep comes at the first tick, not an interval after start-up: a
    # scheduler restarted more often than KILN_SWEEP_INTERVAL_S would otherwise never sweep.
    last_sweep: float | None = None
    while not stop.wait(min(interval, SCHEDULE_TICK_S)):
        if settings.sweep_interval_s and (
            last_sweep is None or time.monotonic() - last_sweep >= settings.sweep_interval_s
        ):
            last_sweep = time.monotonic()
            _sweep_logged(sessions, settings)
        try:
            fire_due(
                sessions,
                send,
                max_queued=settings.max_queued_per_owner,
                expires_after_s=settings.retention_s,
            )
        except Exception:
            log.exception("event=schedules_failed (will retry)")
        try:
            preempt.sweep(sessions, settings)  # decided here only: one process, the db records it
        except Exception:
            log.exception("event=preemption_failed (will retry)")
        if started and time.monotonic() - last_reconcile < interval:
            continue
        last_reconcile = time.monotonic()
        started = _reconcile_logged(celery, sessions, settings, started_at) or started


def _sweep_logged(sessions: sessionmaker[Session], settings: Settings) -> None:
    """One retention sweep, logged; a failure is logged and the next interval retries."""
    try:
        sweeper.log_report(sweeper.sweep(sessions, settings, open_store(settings)))
    except Exception:
        log.exception("event=sweep_failed (will retry)")


def _reconcile_logged(
    celery: Celery, sessions: sessionmaker[Session], settings: Settings, started_at: datetime
) -> bool:
    """One sweep, its outcome logged; False if it failed (it is retried later)."""
    try:
        report = reconcile_once(celery, sessions, settings, started_at)
    except Exception:
        log.exception("event=reconcile_failed (will retry)")
        return False
    if report != Report():
        log.info("event=reconciled %s", report)
    return True


def reconcile_once(
    celery: Celery,
    sessions: sessionmaker[Session],
    settings: Settings,
    started_at: datetime | None = None,
) -> Report:
    """One reconciling sweep against this broker (the scheduler's loop body; tests call it).
    `started_at`: the scheduler's start; messages sent before it get no resend grace."""
    return reconcile(
        sessions,
        settings,
        celery_sender(celery),
        lambda queue: waiting_messages(celery, queue),
        started_at,
    )
