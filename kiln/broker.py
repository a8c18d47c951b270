"""make_celery(): the one Celery configuration, used by the web to send and workers to consume."""

from __future__ import annotations

import base64
import json
from typing import Protocol

from celery import Celery
from kombu import Queue
from kombu.exceptions import ChannelError

from kiln import routing
from kiln.settings import Settings


def broker_url(settings: Settings) -> str:
    """The broker URL; `kiln run` sets KILN_REDIS_URL to its embedded Redis when none is given."""
    if not settings.redis_url:
        raise RuntimeError(
            "KILN_REDIS_URL is not set: point it at a Redis server, or start everything "
            "with `kiln run`, which starts an embedded Redis when none is named"
        )
    return settings.redis_url


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app; tasks are registered by workers.tasks, sent by name from web."""
    app = Celery("kiln", broker=broker_url(settings), set_as_current=False)
    app.conf.update(
        # JSON only: nothing a client sends is ever unpickled.
        task_serializer="json",
        accept_content=["json"],
        # The database is the source of truth for job state; no result backend at all.
        task_ignore_result=True,
        result_backend=None,
        # Ack after the job ran, and put the message back if the worker process dies, so a
        # crashed worker loses no job. prefetch 1: a worker holds at most one waiting job.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Redis redelivers an unacked message after this long, even to a second worker
            # while the first still runs it: claims check the attempt number, so that is
            # harmless, and a long timeout keeps it rare. The reconciler, not this timeout,
            # is what recovers jobs from dead workers quickly (heartbeats).
            "visibility_timeout": settings.visibility_timeout_s,
            # A GPU worker lists its queues as (gpu.<n>, gpu, cpu): take them in that order,
            # so a GPU is never busy with CPU work while GPU jobs wait (kombu's default
            # rotates between queues). Message priority still comes first.
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        # A broker blip (Redis restarting) must not kill running jobs: they finish and
        # write their result to the database; a redelivered copy is dropped by the claim.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_default_queue=routing.CPU_QUEUE,
        # kombu's Queue.__init__ carries no annotations.
        task_queues=[Queue(routing.CPU_QUEUE), Queue(routing.GPU_QUEUE)],  # type: ignore[no-untyped-call]
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Hard limit: the pool process is killed past it; the reconciler then fails the job
        # with the reason (the soft limit is RunContext's own check, at job_time_limit_s).
        task_time_limit=(
            settings.job_time_limit_s + settings.time_limit_grace_s
            if settings.job_time_limit_s
            else None
        ),
        # Memory guard: recycle pool processes so one leaky job cannot grow a worker forever.
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_max_memory_per_child=settings.worker_max_memory_per_child_kb,
    )
    return app


class QueuedAttempt(Protocol):
    """What a run message is made of; a job row (db.models.Job) is one."""

    @property
    def id(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def queue(self) -> str: ...
    @property
    def priority(self) -> int: ...


class Sender(Protocol):
    """Sends the run message of a queued attempt, delivered after `countdown` seconds.

    The one type of every sender: the web's, the workers' re-queue, the scheduler's, the
    reconciler's, and the recording ones tests pass to create_app and fire_due.
    """

    def __call__(self, job: QueuedAttempt, countdown: float = 0.0, /) -> None: ...


def celery_sender(celery: Celery) -> Sender:
    """The sender that puts run messages on this Celery app's broker."""

    def send(job: QueuedAttempt, countdown: float = 0.0, /) -> None:
        send_run(celery, job.id, job.attempt, job.queue, job.priority, countdown)

    return send


def send_run(
    celery: Celery, job_id: str, attempt: int, queue: str, priority: int, countdown: float = 0
) -> None:
    """Send the one message a job needs: its id and the attempt it is queued for."""
    celery.send_task(
        routing.RUN_TASK,
        args=[job_id, attempt],
        queue=queue,
        # Redis pops priority 0 first; Kiln's API says 9 is most urgent.
        priority=9 - priority,
        countdown=countdown or None,
    )


def waiting_messages(celery: Celery, queue: str) -> set[tuple[str, int]]:
    """(job id, attempt) of every run message waiting in `queue`, at every priority level.

    kombu's Redis transport keeps a queue as one list per priority step, each element a
    JSON envelope whose base64 body is Celery's [args, kwargs, embed]. Reading them lets the
    reconciler tell which queued jobs still have a live message after Redis lost some. The
    scan is O(queue length) per sweep, which is fine at Kiln's scale (thousands, not
    millions, of waiting jobs). Messages a worker holds (the unacked hash) are not counted:
    with prefetch 1 those are jobs being claimed or run, and the claim decides for them.
    """
    found: set[tuple[str, int]] = set()
    with celery.connection_for_read() as connection:
        channel = connection.default_channel
        client = channel.client
        for step in channel.priority_steps:
            for raw in client.lrange(channel._q_for_pri(queue, step), 0, -1):
                parsed = _run_args(raw)
                if parsed is not None:
                    found.add(parsed)
    return found


def _run_args(raw: bytes) -> tuple[str, int] | None:
    """(job id, attempt) of one kombu envelope, or None for anything else."""
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]), int(args[1])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def queue_length(celery: Celery, queue: str) -> int:
    """Messages waiting in `queue` (all priority levels), not counting ones being worked on."""
    with celery.connection_for_read() as connection:
        channel = connection.default_channel
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError as exc:
            # Redis deletes a list once its last message is popped, so an empty queue
            # answers NOT_FOUND to a passive declare: that means nothing is waiting.
            if str(exc.reply_code) == "404":
                return 0
            raise
