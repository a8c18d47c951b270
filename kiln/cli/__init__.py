"""The `kiln` command: client commands that call a Kiln server over HTTP, and server
commands that run Kiln's processes on its own hosts.

The group and its help live here; the client commands in `kiln.client_cli` (schedules in
`kiln.cli.schedules`, the admin's `kiln workers` in `kiln.cli.workers`); the server
commands in `kiln.cli.server`, the one module of `kiln` that may import `db` and `workers`
(lazily, inside the commands, so `kiln --help` and the client commands stay light).
"""

from __future__ import annotations

from kiln.cli import server
from kiln.cli.group import main
from kiln.cli.schedules import schedules
from kiln.cli.workers import workers
from kiln.client_cli import COMMANDS

for _command in (*COMMANDS, schedules, workers, *server.COMMANDS):
    main.add_command(_command)

__all__ = ["main"]
