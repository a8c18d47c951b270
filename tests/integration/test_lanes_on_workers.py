"""Lanes through real processes: with the CPU's bulk and interactive workers started as
the launcher plans them, an echo job (interactive lane) finishes while a long training run
(bulk lane) keeps the bulk worker busy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

#: Far more epochs than the test lets run: the training is cancelled once it has served.
_LONG_TRAIN = {"model_name": "long", "dataset": "builtin:digits", "epochs": 5000, "device": "cpu"}


def test_an_interactive_job_finishes_while_a_long_train_job_holds_the_bulk_worker(
    api: Any, start_worker: Callable[..., Any]
) -> None:
    bulk = start_worker("bulk")
    interactive = start_worker("interactive")
    train = api.submit("train", _LONG_TRAIN)
    api.wait_for(train["id"], "running")

    echo = api.submit("echo", {"message": "served at once"})
    done = api.wait_for(echo["id"], "succeeded")

    training = api.job(train["id"])
    assert training["state"] == "running", training  # still busy: the echo did not wait
    assert (train["queue"], echo["queue"]) == ("cpu", "interactive.cpu")
    assert training["worker"].startswith(f"{bulk.name}@")
    assert done["worker"].startswith(f"{interactive.name}@")
    assert done["result"] == {"message": "served at once"}
    api.cancel(train["id"])
    api.wait_for(train["id"], "cancelled")
