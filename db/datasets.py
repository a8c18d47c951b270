"""Uploaded datasets: record one, find the owner's, list them, delete one.

The owner rule lives here, as in db/jobs.py, db/registry.py and db/schedules.py: `owner`
None is an admin, who sees every owner's rows; anyone else sees only their own.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import owned, references, registry
from db.base import utcnow
from db.models import Dataset
from kiln.datasets import DatasetInfo
from kiln.errors import InUse


def create(
    session: Session,
    *,
    owner: str,
    name: str,
    info: DatasetInfo,
    size_bytes: int,
    digest: str,
) -> Dataset:
    """Record an upload whose file is already in the artifact store (`info`: what parsing
    it found); the caller commits."""
    dataset = Dataset(
        owner=owner,
        name=name,
        format=info.format,
        rows=info.rows,
        columns=info.columns,
        size_bytes=size_bytes,
        digest=digest,
        created_at=utcnow(),
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_owned(session: Session, dataset_id: str, owner: str | None) -> Dataset:
    """The dataset, if `owner` may see it (None: an admin sees all); otherwise NotFound."""
    return owned.get_owned(session, Dataset, dataset_id, owner)


def listed(session: Session, owner: str | None) -> list[Dataset]:
    """The datasets `owner` may see, newest first."""
    newest_first = (Dataset.created_at.desc(), Dataset.id.desc())
    return list(session.scalars(owned.visible(Dataset, owner, *newest_first)))


def by_digest(session: Session, digests: Iterable[str]) -> dict[tuple[str, str], Dataset]:
    """The uploads holding these files, by (owner, digest): a version's lineage link."""
    wanted = set(digests)
    if not wanted:
        return {}
    rows = session.scalars(select(Dataset).where(Dataset.digest.in_(wanted)))
    return {(d.owner, d.digest): d for d in rows}


def delete(session: Session, dataset: Dataset) -> str | None:
    """Delete a dataset, refused (InUse) while a model version's lineage names its file.
    Returns its digest when nothing refers to the file any more: the caller removes the
    file after committing (the store shares one file between identical uploads)."""
    users = registry.versions_trained_on(session, dataset)
    if users:
        shown = ", ".join(users[:5]) + (" ..." if len(users) > 5 else "")
        raise InUse(f"model versions were trained on this dataset ({shown}); delete them first")
    digest = dataset.digest
    session.delete(dataset)
    session.flush()
    return None if references.digest_in_use(session, digest) else digest
