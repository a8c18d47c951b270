"""gunicorn's settings for `kiln web` (`--config python:kiln.cli.gunicorn_config`).

- Log lines: gunicorn's boot, error and access lines go through Kiln's formatter
  (kiln/logs.py), so off a terminal every line of the web process is one JSON object.
- Workers die with the master: a worker gets SIGKILL when its master dies, however the
  master dies (gunicorn itself would notice only at its next timeout check).
"""

from __future__ import annotations

import signal
from typing import Any

from gunicorn import glogging

from kiln import logs
from kiln.settings import Settings
from kiln.supervise import die_with_parent


class KilnLogger(glogging.Logger):  # type: ignore[misc]  # gunicorn ships no types
    """gunicorn's logger, writing through the root logger's Kiln handler."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)  # levels, and whether access lines are wanted (--access-logfile)
        logs.configure(Settings().log_format, self.loglevel)
        for log in (self.error_log, self.access_log):
            for handler in [h for h in log.handlers if getattr(h, "_gunicorn", False)]:
                log.removeHandler(handler)
            log.propagate = True


logger_class = f"{__name__}.KilnLogger"


def post_fork(server: Any, worker: Any) -> None:
    die_with_parent(signal.SIGKILL, server.pid)
