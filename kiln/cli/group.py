"""The `kiln` click group: its help, the two sections of commands and the exit codes."""

from __future__ import annotations

from typing import Any

import click

from kiln.client_cli import Remote, exit_code

_HELP = """Kiln: an asynchronous job-queue backend for PyTorch.

Client commands talk to a Kiln server over HTTP: the server at --url (or KILN_URL,
default http://127.0.0.1:8000) with the key --api-key (or KILN_API_KEY).
Server commands run on Kiln's own hosts and read KILN_DATABASE_URL, KILN_REDIS_URL and
the other KILN_* settings. `kiln keys` is both: with a server named (--url or KILN_URL)
it calls the API with an admin key; without one it writes to the database directly.

\b
Exit codes:
  0  success (for wait: the job succeeded)
  1  the job failed or was cancelled (wait, submit --wait, follow)
  2  usage error (bad flags, unreadable spec file)
  3  the API refused the request (4xx other than below, 5xx)
  4  not found (no such job, model, dataset or key; or not yours)
  5  authentication or permission (no key, unknown or revoked key, not admin)
  6  wait --timeout passed before the job finished
  7  the server cannot be reached
"""


SERVER_SECTION = "Server commands (on Kiln's hosts)"
CLIENT_SECTION = "Client commands (over HTTP)"


class KilnGroup(click.Group):
    """Lists commands in two sections and turns client errors into documented exit codes."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {CLIENT_SECTION: [], SERVER_SECTION: []}
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            section = getattr(command, "kiln_section", CLIENT_SECTION)
            sections[section].append((name, command.get_short_help_str(limit=60)))
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from kiln.client import ClientError

        try:
            return super().invoke(ctx)
        except ClientError as exc:
            message = f"error: {exc}"
            click.echo(message, err=True)
            for detail in getattr(exc, "errors", []):
                where = ".".join(map(str, detail.get("loc", [])))
                line = f"{where}: {detail.get('msg')}"
                if line not in message:  # the summary already names a lone error
                    # stderr, like the error: stdout carries only answers (`id=$(kiln submit …)`).
                    click.echo(f"  {line}", err=True)
            ctx.exit(exit_code(exc))


def server_command(command: click.Command) -> click.Command:
    """Lists `command` under the server section of `kiln --help`."""
    command.kiln_section = SERVER_SECTION  # type: ignore[attr-defined]
    return command


@click.group(cls=KilnGroup, help=_HELP)
@click.option("--url", envvar="KILN_URL", help="The Kiln server [KILN_URL].")
@click.option("--api-key", envvar="KILN_API_KEY", help="Your API key [KILN_API_KEY].")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answers as JSON.")
@click.pass_context
def main(ctx: click.Context, url: str | None, api_key: str | None, as_json: bool) -> None:
    ctx.obj = Remote(url=url, api_key=api_key, as_json=as_json)
