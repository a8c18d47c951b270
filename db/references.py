"""What refers to an artifact: the one answer to "may this file go?".

The artifact store shares one file between identical contents, so a file may be removed only
when no row refers to its digest: a dataset, a model version's weights, training data or
exports, or the output and error files of a job that has not expired.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Text, cast, select
from sqlalchemy.orm import Session

from db.models import Dataset, Job, ModelVersion

#: The kinds whose result names files in the artifact store: batch_predict's output and
#: error file, export's file. (predict results, the large ones, name none.)
STORING_KINDS = ("batch_predict", "export")


def result_digests(result: dict[str, Any] | None) -> set[str]:
    """The digests a job's result names: its own `digest`, and each entry's that is a
    described file ({"digest": ..., "format": ...})."""
    found: set[str] = set()
    if not isinstance(result, dict):
        return found
    if isinstance(result.get("digest"), str):
        found.add(result["digest"])
    for entry in result.values():
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            found.add(entry["digest"])
    return found


def _storing_results() -> Select[tuple[Any]]:
    return select(Job.result).where(
        Job.kind.in_(STORING_KINDS), Job.result.is_not(None), Job.expired_at.is_(None)
    )


def digest_in_use(session: Session, digest: str) -> bool:
    """Whether any row still refers to this artifact."""
    for column in (Dataset.digest, ModelVersion.artifact_digest, ModelVersion.dataset_digest):
        if session.scalar(select(column).where(column == digest).limit(1)) is not None:
            return True
    # Exports and job results live in JSON columns; there are few, so they are checked
    # here, not in SQL (the text match only narrows the job rows read).
    exports = session.scalars(select(ModelVersion.exports))
    if any(e.get("digest") == digest for found in exports for e in found.values()):
        return True
    results = session.scalars(_storing_results().where(cast(Job.result, Text).contains(digest)))
    return any(digest in result_digests(result) for result in results)


def referenced(session: Session) -> set[str]:
    """Every digest some row refers to: what the sweeper must never remove."""
    found: set[str] = set(session.scalars(select(Dataset.digest)))
    for weights, data, exports in session.execute(
        select(ModelVersion.artifact_digest, ModelVersion.dataset_digest, ModelVersion.exports)
    ):
        found.add(weights)
        if data is not None:
            found.add(data)
        found.update(e["digest"] for e in exports.values() if "digest" in e)
    for result in session.scalars(_storing_results()):
        found |= result_digests(result)
    return found
