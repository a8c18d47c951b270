"""Job tags in SQL: the rows a submission writes and the filter GET /jobs?tag= applies."""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, exists, select

from db.models import Job, JobTag


def rows(tags: dict[str, str]) -> list[JobTag]:
    """The tag rows of a new job (its id is filled in by the relationship)."""
    return [JobTag(key=key, value=value) for key, value in sorted(tags.items())]


def matching(filters: list[tuple[str, str | None]]) -> ColumnElement[bool]:
    """Jobs that carry every tag in `filters` (AND): (key, value), or (key, None) for any
    value. Each is an EXISTS on job_tags' primary key (job_id, key), so the cost follows
    the jobs the listing reads, not the tags stored."""
    conditions = []
    for key, value in filters:
        tag = and_(JobTag.job_id == Job.id, JobTag.key == key)
        if value is not None:
            tag = and_(tag, JobTag.value == value)
        conditions.append(exists(select(JobTag.job_id).where(tag)))
    return and_(*conditions)
