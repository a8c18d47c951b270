"""Supervisor: run child processes in the foreground, restart the ones that die, and stop
them all (each with its whole process group) on SIGTERM or SIGINT.

However the supervisor dies (SIGKILL, the OOM killer), its children die with it: each is
started with Linux's parent-death signal (`die_with_parent`), SIGTERM by default, so a
child still stops its own children gracefully (gunicorn its workers, the launcher its
Celery workers). Grandchildren carry their own: gunicorn's workers (kiln.cli.gunicorn_config)
and Celery's pool processes (Celery sets SIGKILL) die with their parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
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


#: prctl(2) option: the signal this process gets when the thread that started it exits.
_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded once in the parent (never between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> bool:
    """Have the kernel send this process `sig` when its parent dies (kept across exec).

    With `parent_pid`, a parent that died before the call (this process was re-parented
    already) sends the signal at once. Returns False where the platform has no such thing.
    """
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


def child_setup(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets `sig` when the calling process (and thread) dies."""
    _prctl()  # load libc here, in the parent
    parent = os.getpid()

    def setup() -> None:
        die_with_parent(sig, parent)

    return setup


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
        # A new session per child: stopping it stops its own children too (Celery's pool),
        # and a Ctrl-C reaches only this supervisor, which stops the children in order.
        # Popen runs from this thread only (the parent-death signal follows the thread).
        child.process = subprocess.Popen(
            child.argv, env=dict(child.env), start_new_session=True, preexec_fn=child_setup()
        )
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
