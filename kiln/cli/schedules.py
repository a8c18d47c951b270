"""`kiln schedules`: list, create, show, pause, resume and delete cron schedules
(/api/v1/schedules), a thin shell over kiln.Client like the other client commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kiln.client_cli import current_remote, job_template, print_json


@click.group()
def schedules() -> None:
    """Cron schedules that submit a job at each slot (UTC)."""


@schedules.command(name="list")
def list_schedules() -> None:
    """Your schedules: id, name, cron, kind, and when each fires next."""
    remote = current_remote()
    found = remote.client().schedules()
    if remote.as_json:
        print_json(found)
        return
    for schedule in found:
        click.echo(_line(schedule))


@schedules.command(
    name="create",
    context_settings={"ignore_unknown_options": True},
    short_help="Schedule a job template; prints the schedule's id.",
    epilog="The job is given as for `kiln submit`: a kind and --field value flags, or a "
    "spec file (-f), flags overriding the file. CRON is five fields in UTC, quoted: "
    "'0 2 * * *' is 02:00 every day.",
)
@click.argument("name")
@click.argument("cron")
@click.argument("template", nargs=-1, type=click.UNPROCESSED, metavar="[KIND] [--FIELD VALUE]...")
@click.option(
    "-f",
    "--file",
    "spec_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A YAML or JSON file: {kind, spec, priority}, or the spec alone.",
)
@click.option("--priority", type=click.IntRange(0, 9), help="0 (default) to 9 (most urgent).")
@click.option("--paused", is_flag=True, help="Create it paused (resume it to start firing).")
def create_schedule(
    name: str,
    cron: str,
    template: tuple[str, ...],
    spec_file: Path | None,
    priority: int | None,
    paused: bool,
) -> None:
    """Schedule NAME to submit a job at each slot of CRON; its jobs count against your
    queue quota like submitted ones (a slot that finds you at the quota is skipped)."""
    job = job_template(list(template), spec_file, priority)
    remote = current_remote()
    schedule = remote.client().create_schedule(
        name, cron, job.kind, job.spec, job.priority, enabled=not paused, **job.options
    )
    _answer(schedule, remote.as_json)


@schedules.command(name="show")
@click.argument("schedule_id")
def show_schedule(schedule_id: str) -> None:
    """One schedule, with its template and next run times."""
    print_json(current_remote().client().schedule(schedule_id))


@schedules.command(name="pause")
@click.argument("schedule_id")
def pause_schedule(schedule_id: str) -> None:
    """Stop a schedule firing (its slots while paused are not made up)."""
    remote = current_remote()
    _answer(remote.client().pause_schedule(schedule_id), remote.as_json)


@schedules.command(name="resume")
@click.argument("schedule_id")
def resume_schedule(schedule_id: str) -> None:
    """Start a paused schedule firing again, from its next slot."""
    remote = current_remote()
    _answer(remote.client().resume_schedule(schedule_id), remote.as_json)


@schedules.command(name="delete")
@click.argument("schedule_id")
def delete_schedule(schedule_id: str) -> None:
    """Delete a schedule (the jobs it already submitted stay)."""
    current_remote().client().delete_schedule(schedule_id)
    click.echo(f"deleted schedule {schedule_id}", err=True)


def _answer(schedule: dict[str, Any], as_json: bool) -> None:
    """The id alone on stdout (`sid=$(kiln schedules create …)`), the summary on stderr."""
    if as_json:
        print_json(schedule)
        return
    click.echo(schedule["id"])
    click.echo(_line(schedule), err=True)


def _line(schedule: dict[str, Any]) -> str:
    when = f"next {schedule['next_run_at']}" if schedule["enabled"] else "paused"
    return f"{schedule['id']}  {schedule['name']}  '{schedule['cron']}'  {schedule['kind']}  {when}"
