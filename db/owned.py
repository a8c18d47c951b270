"""The owner rule, written once: a user sees only their own rows; `owner` None is an admin,
who sees every owner's. db/jobs.py, db/datasets.py, db/registry.py and db/schedules.py build
their `get_owned` and `listed` on these two."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from db.models import Dataset, Job, Model, Schedule
from kiln.errors import NotFound

Owned = TypeVar("Owned", Job, Dataset, Model, Schedule)


def get_owned(session: Session, table: type[Owned], row_id: str, owner: str | None) -> Owned:
    """The row, if `owner` may see it; otherwise NotFound ("no <table> <id>"), the same
    answer whether the row is missing or another owner's."""
    row = session.get(table, row_id)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFound(f"no {table.__name__.lower()} {row_id}")
    return row


def visible(table: type[Owned], owner: str | None, *order_by: Any) -> Select[Owned]:
    """SELECT the rows of `table` that `owner` may see, in `order_by` order."""
    query = select(table).order_by(*order_by)
    return query if owner is None else query.where(table.owner == owner)
