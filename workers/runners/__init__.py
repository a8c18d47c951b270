"""RUNNERS: each job kind's run(spec, ctx) -> result. One line per kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.runners import batch, echo, export, optimize, predict, train

Runner = Callable[[Any, Any], dict[str, Any]]

RUNNERS: dict[str, Runner] = {
    "train": train.run,
    "predict": predict.run,
    "optimize": optimize.run,
    "export": export.run,
    "batch_predict": batch.run,
    "echo": echo.run,
}
