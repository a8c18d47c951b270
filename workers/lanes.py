"""What a job's lane means inside the worker that runs it: its attempt's time limit.

The lane itself is decided at submit time (kiln.routing.queue_for) and recorded in the
job's queue, so the limit follows the queue the job was sent to, not the worker's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln import routing
from kiln.settings import Settings
from workers.reconcile import time_limit_reason


@dataclass(frozen=True)
class TimeLimit:
    seconds: float
    #: What the job's failure says once it runs past the limit.
    reason: str


def interactive_limit_reason(limit_s: float) -> str:
    """The failure of an interactive job past its lane's limit, saying what to do instead."""
    return (
        f"{time_limit_reason(limit_s)} (the interactive lane's limit, "
        "KILN_INTERACTIVE_TIME_LIMIT_S): predict is for a few rows at a time; "
        "score large inputs with a batch_predict job, which runs in the bulk lane "
        "in resumable chunks"
    )


def attempt_time_limit(settings: Settings, queue: str) -> TimeLimit | None:
    """The soft time limit of one attempt of a job sent to `queue`: KILN_JOB_TIME_LIMIT_S
    everywhere, and in the interactive lane KILN_INTERACTIVE_TIME_LIMIT_S if shorter."""
    general = settings.job_time_limit_s
    if routing.lane_of_queue(queue) == routing.INTERACTIVE:
        lane = settings.interactive_time_limit_s
        if general is None or lane < general:
            return TimeLimit(lane, interactive_limit_reason(lane))
    return TimeLimit(general, time_limit_reason(general)) if general else None
