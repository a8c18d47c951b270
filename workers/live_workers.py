"""Which live workers consume a queue, asked of the workers themselves through Celery's
remote control (the broadcast `inspect active_queues`): the one place Kiln counts them
(a sharded batch job's `shards: auto`)."""

from __future__ import annotations

from celery import Celery

#: How long to wait for the workers' replies by default (KILN_SHARDS_AUTO_WAIT_S): a live
#: worker answers in milliseconds, even one busy with a job (its main process answers; the
#: job runs in its pool process), and every job that splits with `auto` waits this long. A
#: worker too loaded to answer in time is not counted: the job gets fewer shards.
REPLY_TIMEOUT_S = 0.3


def serving(celery: Celery, queue: str, timeout_s: float = REPLY_TIMEOUT_S) -> int:
    """How many live workers consume `queue` (0 when none answered)."""
    replies = celery.control.inspect(timeout=timeout_s).active_queues() or {}
    return sum(
        1 for queues in replies.values() if any(q.get("name") == queue for q in queues or [])
    )
