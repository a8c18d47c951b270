"""`kiln workers`: the live worker processes, as GET /api/v1/workers reports them (admin)."""

from __future__ import annotations

from typing import Any

import click

from kiln.client_cli import current_remote, print_json


@click.command(short_help="The live workers: devices, lane, job, heartbeat (admin).")
def workers() -> None:
    """Every live worker process: its name (device@host), devices, lane, the job it runs
    and its last heartbeat (needs an admin key; --json adds its host, queues and pid)."""
    remote = current_remote()
    found = remote.client().workers()
    if remote.as_json:
        print_json(found)
        return
    # The host is in the name (cpu0@host), the queues follow from the lane: --json has both.
    rows: list[tuple[str, ...]] = [("NAME", "DEVICES", "LANE", "JOB", "HEARTBEAT")]
    rows += [_row(worker) for worker in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]).rstrip())
    if not found:
        click.echo("no live workers", err=True)


def _row(worker: dict[str, Any]) -> tuple[str, ...]:
    job = worker.get("job")
    current = f"{job['id']} {job['progress']:.0%}" if job else "-"
    return (
        worker["name"],
        ",".join(worker["devices"]),
        worker["lane"],
        current,
        f"{worker['heartbeat_age_s']:.0f}s ago",
    )
