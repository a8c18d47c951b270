"""The delivery process (`kiln deliver`): sends the webhook outbox's due messages.

Claiming is continuous: `webhook_concurrency` sends may be in flight at once, and a finished
send frees its slot for the next due message at once (Dispatcher), so one receiver that hangs
until `webhook_timeout_s` holds up only its own slot, never the other jobs' messages. Each
claim takes a lease (db.webhooks.claim) on at most as many messages as there are free slots,
signs each with its owner's secrets at the moment of sending (kiln.webhooks), POSTs it
through kiln.egress (the destination checked again, no redirects, one deadline), and
records the attempt: a 2xx delivers the message; anything else schedules the next attempt
after an exponential back-off with jitter, until the message is `webhook_max_age_s` old,
when it is given up (`failed`).

Receivers get every message at least once: a process killed between the POST and its
record leaves the lease to run out, and the message is sent again (same webhook-id). Any
number of delivery processes may run; a claim is a compare-and-set on the row.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from db import webhooks as outbox
from db.base import utcnow
from db.engine import make_engine, make_sessionmaker, session_scope
from kiln import egress, webhooks
from kiln.settings import Settings

log = logging.getLogger(__name__)

#: Recorded errors are cut to this many characters.
_MAX_ERROR = 500


def deliver_due(sessions: sessionmaker[Session], settings: Settings) -> int:
    """One synchronous round: claim the due messages (up to webhook_concurrency) and
    deliver each once, in turn; returns how many were attempted. (`kiln deliver` sends
    continuously through Dispatcher instead.)"""
    with session_scope(sessions) as session:
        claimed = outbox.claim(
            session,
            lease=timedelta(seconds=settings.webhook_lease_s),
            limit=settings.webhook_concurrency,
        )
    for message in claimed:
        attempt(sessions, settings, message)
    return len(claimed)


class Dispatcher:
    """Keeps up to `webhook_concurrency` attempts in flight on `pool`: `fill()` claims only
    as many due messages as there are free slots, and each finished attempt frees its slot
    (and wakes `wait_for_slot`), so a slow receiver never holds up the others' messages."""

    def __init__(
        self, sessions: sessionmaker[Session], settings: Settings, pool: ThreadPoolExecutor
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._pool = pool
        self._in_flight = 0
        self._changed = threading.Condition()

    @property
    def free(self) -> int:
        with self._changed:
            return self._settings.webhook_concurrency - self._in_flight

    def fill(self) -> int:
        """Claim due messages for the free slots and start sending them; returns how many."""
        free = self.free
        if free <= 0:
            return 0
        with session_scope(self._sessions) as session:
            claimed = outbox.claim(
                session, lease=timedelta(seconds=self._settings.webhook_lease_s), limit=free
            )
        for message in claimed:
            with self._changed:
                self._in_flight += 1
            self._pool.submit(attempt, self._sessions, self._settings, message).add_done_callback(
                self._done
            )
        return len(claimed)

    def wait_for_slot(self, timeout: float) -> bool:
        """Wait until a slot is free; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._in_flight < self._settings.webhook_concurrency, timeout
            )

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no attempt is in flight (each one recorded); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout)

    def _done(self, future: Future[None]) -> None:
        if future.exception() is not None:  # attempt() records its own failures; log the rest
            log.error(
                "event=deliver_failed error=%r (the lease runs out: sent again)", future.exception()
            )
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()


def attempt(sessions: sessionmaker[Session], settings: Settings, message: outbox.Claimed) -> None:
    """Sign, send and record one attempt of a claimed message."""
    with session_scope(sessions) as session:
        secrets = outbox.signing_secrets(session, message.owner)
    started = utcnow()
    signed = webhooks.headers(secrets, message.id, int(started.timestamp()), message.body)
    status: int | None = None
    latency_ms: float | None = None
    try:
        answer = egress.post(
            message.url,
            message.body.encode(),
            signed,
            settings.egress_policy,
            settings.webhook_timeout_s,
        )
        status, latency_ms = answer.status, answer.latency_ms
        error = None if 200 <= status < 300 else f"HTTP {status}"
    except egress.Refused as exc:
        error = f"refused: {exc}"
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    with session_scope(sessions) as session:
        if error is None:
            assert status is not None
            assert latency_ms is not None
            outbox.delivered(session, message, status, latency_ms, started)
            log.info("message=%s event=webhook_delivered status=%d", message.id, status)
            return
        retry_at = _retry_at(settings, message)
        outbox.not_delivered(
            session,
            message,
            started,
            status=status,
            latency_ms=latency_ms,
            error=error[:_MAX_ERROR],
            retry_at=retry_at,
        )
    if retry_at is None:
        log.warning("message=%s event=webhook_given_up error=%s", message.id, error)
    else:
        log.info("message=%s event=webhook_retry at=%s error=%s", message.id, retry_at, error)


def _retry_at(settings: Settings, message: outbox.Claimed) -> datetime | None:
    """When to try again, or None once that would pass the message's max age."""
    delay = webhooks.retry_delay_s(
        message.attempt, settings.webhook_retry_base_s, settings.webhook_retry_max_s
    )
    when = utcnow() + timedelta(seconds=delay)
    if when > message.created_at + timedelta(seconds=settings.webhook_max_age_s):
        return None
    return when


def run_forever(settings: Settings) -> None:
    """Deliver due messages until SIGTERM or SIGINT, refilling each slot as its send ends;
    idle, look again every webhook_poll_s. Sends in flight finish (their attempts are
    recorded) before exit."""
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("event=deliver_started concurrency=%d", settings.webhook_concurrency)
    with ThreadPoolExecutor(settings.webhook_concurrency, "deliver") as pool:
        dispatcher = Dispatcher(sessions, settings, pool)
        while not stop.is_set():
            try:
                claimed = dispatcher.fill()
            except Exception:
                log.exception("event=deliver_failed (will retry)")
                claimed = 0
            if dispatcher.free <= 0:
                dispatcher.wait_for_slot(settings.webhook_poll_s)  # refill as soon as one ends
            elif not claimed:
                stop.wait(settings.webhook_poll_s)  # nothing due: look again later
