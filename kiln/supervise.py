"""Supervisor: run child processes in the foreground, restart the ones that die, and stop
them all (each with its whole process group) on SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

#: How long children get to stop after SIGTERM before they are killed.
GRACE_S = 20.0
_MAX_BACKOFF_S = 30.0


@dataclass
class _Child:
    name: str
    argv: list[str]
    env: Mapping[str, str]
    process: subprocess.Popen[bytes] | None = None
    backoff_s: float = 1.0
    restart_at: float = field(default=0.0)


class Supervisor:
    def __init__(self, restart: bool) -> None:
        self.restart = restart
        self.children: list[_Child] = []
        self._stopping = False

    def add(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        self.children.append(_Child(name, argv, env))

    def run(self) -> int:
        """Start every child and watch them; returns when signalled or (without restart)
        when any child exits, after stopping the rest."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for child in self.children:
                self._start(child)
            return self._watch()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("event=stopping signal=%s", signal.Signals(signum).name)
        self._stopping = True

    def _start(self, child: _Child) -> None:
        # A new session per child: stopping it stops its own children too (Celery's pool).
        child.process = subprocess.Popen(child.argv, env=dict(child.env), start_new_session=True)
        log.info("event=started name=%s pid=%d", child.name, child.process.pid)

    def _watch(self) -> int:
        while not self._stopping:
            for child in self.children:
                code = child.process.poll() if child.process else None
                if child.process is not None and code is not None:
                    log.warning("event=exited name=%s code=%s", child.name, code)
                    if not self.restart:
                        return code or 1
                    child.process = None
                    child.restart_at = time.monotonic() + child.backoff_s
                    child.backoff_s = min(child.backoff_s * 2, _MAX_BACKOFF_S)
                elif child.process is None and time.monotonic() >= child.restart_at:
                    self._start(child)
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        """SIGTERM every child's process group, then SIGKILL what is left after GRACE_S."""
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        for process in running:
            _signal_group(process, signal.SIGKILL)  # stragglers of exited parents


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
