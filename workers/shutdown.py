"""Warm shutdown: SIGTERM in a pool process asks the running job to stop and re-queue.

A pool process dies on SIGTERM (billiard installs an exit handler), so a SIGTERM sent to
the worker's process group (the Supervisor stops children that way; so do systemd and
`docker stop` through `kiln run`) would kill the running job mid-step and spend one of its
attempts. While a job runs, SIGTERM instead sets workers.context.SHUTDOWN: the runner's
next ctx check raises WorkerShutdown, the job is re-queued without spending an attempt,
and the task returns so its message is acked. A second SIGTERM during the job, or one
while the process is idle, goes to billiard's handler as before.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from workers.context import SHUTDOWN


@contextmanager
def sigterm_stops_the_job() -> Iterator[None]:
    """While the block runs, the first SIGTERM sets SHUTDOWN instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a threads/solo pool: signals belong to the worker's main process there
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not SHUTDOWN.is_set():
            SHUTDOWN.set()
            return
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
