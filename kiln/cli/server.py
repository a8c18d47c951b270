"""The server commands of `kiln`: they run Kiln's processes on its own hosts (run, web,
worker, scheduler, deliver, migrate) and manage keys in the database. The one module of `kiln`
allowed to import `db` and `workers` (tests/unit/test_boundaries.py enforces it); it does
so inside the commands, so `kiln --help` and the client commands load neither."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from kiln.cli.group import server_command
from kiln.client_cli import Remote
from kiln.settings import Settings, setting_problem

log = logging.getLogger(__name__)


def _settings() -> Settings:
    """Settings for a server command, with logging set up the way they ask. A bad KILN_*
    value is one line naming the variable and what is wrong, and exit status 2."""
    from pydantic import ValidationError

    from kiln import logs

    try:
        settings = Settings()
    except ValidationError as exc:
        click.echo(f"kiln: {setting_problem(exc)}", err=True)
        sys.exit(2)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logs.configure(settings.log_format)
    return settings


@server_command
@click.command(short_help="Web, workers, scheduler and deliverer together (foreground).")
@click.option(
    "--outlive-parent",
    is_flag=True,
    help="Keep running when the process that started it (a shell, make) dies.",
)
def run(outlive_parent: bool) -> None:
    """Web, workers, scheduler and webhook deliverer together, in the foreground; Ctrl-C
    stops them all.

    They stop with it however it dies, and it stops (gracefully, as on SIGTERM) when the
    process that started it dies, unless --outlive-parent."""
    from kiln.supervise import Supervisor, die_with_parent

    settings = _settings()
    if not outlive_parent and os.getppid() > 1:
        die_with_parent(signal.SIGTERM, os.getppid())
    env = dict(os.environ)
    redis = None
    if not settings.redis_url:
        from kiln.embedded import EmbeddedRedisError, start_redis

        try:
            redis = start_redis(settings.data_dir / "redis")
        except EmbeddedRedisError as exc:  # a log line like the rest (JSON off a terminal)
            log.error("event=embedded_redis_failed reason=%s", exc)
            sys.exit(1)
        env["KILN_REDIS_URL"] = redis.url
        log.info("event=embedded_redis_started url=%s", redis.url)
    try:
        _migrate(settings)
        supervisor = Supervisor(restart=True)
        for role in ("web", "worker", "scheduler", "deliver"):
            supervisor.add(role, [sys.executable, "-m", "kiln.cli", role], env)
        log.info("event=serving url=http://%s:%d (Ctrl-C stops it)", settings.host, settings.port)
        code = supervisor.run()
    finally:
        if redis is not None:
            redis.stop()  # last: the workers stopped above still needed it
    sys.exit(code)


#: gunicorn threads per web process for ordinary requests (streams get their own on top).
REQUEST_THREADS = 4


@server_command
@click.command(short_help="The web server (gunicorn).")
def web() -> None:
    """The web server (gunicorn), with /metrics summed over its worker processes."""
    import shutil

    settings = _settings()
    # gunicorn's workers share Prometheus counters through files in this folder; a
    # previous run's files would add stale counts, so it starts empty.
    metrics_dir = settings.prometheus_dir / "web"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.execvp(  # noqa: S606 (fixed argv, replaces this process)
        sys.executable,
        [
            sys.executable, "-m", "gunicorn", "web.wsgi:app",
            # Kiln's JSON log lines, workers that die with the master (kiln/cli/gunicorn_config.py)
            "--config", "python:kiln.cli.gunicorn_config",
            "--bind", f"{settings.host}:{settings.port}",
            # gthread: 4 threads for ordinary requests, plus one per live stream a process
            # admits (KILN_STREAM_THREADS; web/job_streams.py), so streams never take them.
            "--workers", "2", "--threads", str(REQUEST_THREADS + settings.stream_threads),
            "--access-logfile", "-",
            *_control_socket(settings.data_dir),
        ],
    )  # fmt: skip


def _control_socket(data_dir: Path) -> list[str]:
    """gunicorn's control socket (for gunicornc) in this instance's data dir, not the
    per-user default that concurrent instances would share; none if the path is too long."""
    from kiln.embedded import SOCKET_PATH_MAX

    path = data_dir.resolve() / "gunicorn.ctl"
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        log.warning("event=no_control_socket reason='path too long' path=%s", path)
        return ["--no-control-socket"]
    return ["--control-socket", str(path)]


@server_command
@click.command(short_help="The worker launcher (a Celery worker per GPU).")
def worker() -> None:
    """The worker launcher: one Celery worker per GPU, or a CPU worker; metrics on
    KILN_METRICS_PORT."""
    from workers.launch import run as launch

    sys.exit(launch(_settings()))


@server_command
@click.command(short_help="Re-queue lost jobs, resend lost messages.")
def scheduler() -> None:
    """Periodic maintenance: re-queue lost jobs, resend lost messages."""
    from workers.scheduler import run_forever

    run_forever(_settings())


@server_command
@click.command(short_help="Remove expired job files and orphans (retention).")
@click.option("--dry-run", is_flag=True, help="Print what would go; remove nothing.")
def sweep(dry_run: bool) -> None:
    """One retention sweep now (the scheduler runs one every KILN_SWEEP_INTERVAL_S):
    expire finished jobs past their expires_at (their output files, log lines and
    scratch go; the job stays, marked expired), then remove this host's scratch folders of
    jobs that are gone or expired and artifacts nothing refers to, once older than
    KILN_SWEEP_GRACE_S. Prints one line per thing removed (or, --dry-run, that would be)."""
    from db.engine import make_engine, make_sessionmaker
    from kiln.artifacts import open_store
    from workers.sweeper import sweep as run_sweep

    settings = _settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        report = run_sweep(
            make_sessionmaker(engine), settings, open_store(settings), dry_run=dry_run
        )
    finally:
        engine.dispose()
    for removal in report.removals:
        click.echo(removal.line())
    for job_id, live in report.held:
        click.echo(f"kept     {job_id}  (expired, but job {live} resumes from it)")
    verb = "would remove" if dry_run else "removed"
    counts = ", ".join(
        f"{report.count(kind)} {kind}" for kind in ("job", "artifact", "scratch", "stored")
    )
    click.echo(f"{verb}: {counts}", err=True)


@server_command
@click.command(short_help="Send job webhooks from the outbox.")
def deliver() -> None:
    """Send job webhooks: due messages of the outbox, signed, retried with back-off
    (docs/webhooks.md). Any number may run."""
    from workers.deliver import run_forever as deliver_forever

    deliver_forever(_settings())


@server_command
@click.command(short_help="Upgrade the database schema.")
def migrate() -> None:
    """Upgrade the database to the latest schema (and create KILN_ADMIN_KEY's key)."""
    _migrate(_settings())
    click.echo("database is at the latest schema")


def _migrate(settings: Settings) -> None:
    from db import keys
    from db.engine import make_engine, make_sessionmaker, session_scope
    from db.migrate import upgrade

    upgrade(settings.resolved_database_url)
    if settings.admin_key:
        engine = make_engine(settings.resolved_database_url)
        with session_scope(make_sessionmaker(engine)) as session:
            keys.ensure_admin(session, settings.admin_key)
        engine.dispose()


@click.group(name="keys", short_help="API keys (over the API, or in the database).")
def keys_group() -> None:
    """API keys: over the API with --url/KILN_URL (admin key), else in the database."""


def _key_line(key: dict[str, Any]) -> str:
    revoked = f" revoked {key['revoked_at']}" if key.get("revoked_at") else ""
    return f"{key['id']}  {key['owner']:<16} {key['role']:<6} {key['prefix']}…{revoked}"


@keys_group.command(name="create")
@click.option("--owner", required=True, help="Who the key belongs to.")
@click.option("--role", type=click.Choice(["user", "admin"]), default="user")
@click.pass_obj
def create_key(remote: Remote, owner: str, role: str) -> None:
    """Create a key and print it (it is shown this once)."""
    if remote.url:
        key = remote.client().create_key(owner, role)
    else:
        from db import keys

        with _database() as session:
            row, plaintext = keys.create(session, owner=owner, role=role)
            key = {"id": row.id, "owner": owner, "role": role, "key": plaintext}
    if remote.as_json:
        click.echo(json.dumps(key, indent=2, default=str))
        return
    click.echo(f"id={key['id']} owner={owner} role={role}", err=True)
    click.echo(key["key"])


@keys_group.command(name="list")
@click.pass_obj
def list_keys(remote: Remote) -> None:
    """Every key: id, owner, role, the first characters, and when it was revoked."""
    if remote.url:
        found = remote.client().keys()
    else:
        from db import keys
        from kiln.schemas import KeyOut

        with _database() as session:
            found = [
                KeyOut.model_validate(k).model_dump(mode="json") for k in keys.list_keys(session)
            ]
    if remote.as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for key in found:
        click.echo(_key_line(key))


@keys_group.command(name="revoke")
@click.argument("key_id")
@click.pass_obj
def revoke_key(remote: Remote, key_id: str) -> None:
    """Revoke a key by its id."""
    if remote.url:
        remote.client().revoke_key(key_id)
    else:
        from db import keys

        with _database() as session:
            keys.revoke(session, key_id)
    click.echo(f"revoked {key_id}")


@contextmanager
def _database() -> Iterator[Any]:
    from db.engine import make_engine, make_sessionmaker, session_scope

    engine = make_engine(_settings().resolved_database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            yield session
    finally:
        engine.dispose()


#: What kiln.cli adds to the `kiln` group.
COMMANDS = [run, web, worker, scheduler, deliver, migrate, sweep, keys_group]
