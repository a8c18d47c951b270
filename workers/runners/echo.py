"""echo: no ML at all; sleeps (cancellably) and returns its message. For smoke tests."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from kiln.errors import JobFailure
from kiln.specs import EchoSpec
from workers.context import RunContext

_TICK_S = 0.05


def run(spec: EchoSpec, ctx: RunContext) -> dict[str, Any]:
    deadline = time.monotonic() + spec.sleep_s
    while (left := deadline - time.monotonic()) > 0:
        ctx.raise_if_cancelled()
        ctx.progress(1 - left / spec.sleep_s, "sleeping")
        time.sleep(min(_TICK_S, left))
    if (spec.crash or spec.hang_s) and not ctx.runtime.settings.chaos:
        raise JobFailure("crash and hang_s are chaos-testing switches; KILN_CHAOS is off here")
    if spec.crash:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(spec.hang_s)
    if spec.fail_with is not None:
        raise JobFailure(spec.fail_with)
    return {"message": spec.message}
