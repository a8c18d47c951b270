"""Run Alembic from code: upgrade to head, autogenerate a revision, check for drift."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

_INI = Path(__file__).parent / "migrations" / "alembic.ini"


def alembic_config(url: str) -> Config:
    config = Config(str(_INI))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (the only way Kiln's schema changes)."""
    command.upgrade(alembic_config(url), revision)


def check(url: str) -> None:
    """Raise if the models differ from what the migrations build (alembic check)."""
    command.check(alembic_config(url))


def revision(url: str, message: str) -> None:
    command.revision(alembic_config(url), message=message, autogenerate=True)
