"""The model registry: find models and versions, register them, move aliases, delete."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db import owned, references
from db.base import utcnow
from db.models import Dataset, Job, Model, ModelVersion
from kiln.errors import InUse, InvalidRequest, NotFound
from kiln.states import JobState

#: An alias starts with a letter, so it can never be mistaken for a version number.
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,62}$")


def get_model(session: Session, owner: str, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.owner == owner, Model.name == name))
    if model is None:
        raise NotFound(f"no model {name!r}")
    return model


def find_version(session: Session, owner: str, name: str, ref: str | int) -> ModelVersion:
    """The owner's model `name` at `ref`; NotFound says which of the two is missing."""
    return resolve_version(session, get_model(session, owner, name), ref)


def resolve_version(session: Session, model: Model, ref: str | int) -> ModelVersion:
    """A version by number, by alias, or `latest` (the highest number)."""
    number: int | None
    # isdecimal, not isdigit: int() refuses digits such as '²' that isdigit accepts.
    if isinstance(ref, int) or str(ref).isdecimal():
        number = int(ref)
    elif ref == "latest":
        number = session.scalar(
            select(func.max(ModelVersion.number)).where(ModelVersion.model_id == model.id)
        )
    else:
        number = model.aliases.get(str(ref))
    found = None
    # Version numbers start at 1 and fit an INTEGER column; binding a larger one would fail.
    if number is not None and 0 < number < 2**31:
        found = session.scalar(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.number == number
            )
        )
    if found is None:
        raise NotFound(f"model {model.name!r} has no version {ref!r}")
    return found


def register_version(
    session: Session,
    *,
    owner: str,
    name: str,
    source_job_id: str | None,
    arch: str,
    config: dict[str, Any],
    metrics: dict[str, float],
    artifact_digest: str,
    artifact_size: int,
    dataset_digest: str | None,
    lineage: dict[str, Any] | None = None,
    family: str = "zoo",
    task: str | None = None,
) -> ModelVersion:
    """Add the next version of `name` (creating the model). A job registers at most one
    version: if `source_job_id` already has one (a redelivered job), that one is returned.
    `lineage` says where the weights came from (see ModelVersion.lineage)."""
    if source_job_id is not None:
        # The id alone: loading no entity keeps the common case (none yet) cheap.
        existing = session.scalar(
            select(ModelVersion.id).where(ModelVersion.source_job_id == source_job_id)
        )
        if existing is not None:
            return session.get_one(ModelVersion, existing)
    # One atomic increment: two versions registered at once get different numbers, and a
    # deleted version's number is never given out again.
    increment = (
        update(Model)
        .where(Model.owner == owner, Model.name == name)
        .values(last_number=Model.last_number + 1)
        .returning(Model.id, Model.last_number)
    )
    # (A Model this session already holds gets the new last_number too: the ORM applies
    # the increment to it.)
    row = session.execute(increment).one_or_none()
    if row is None:  # the model's first version
        session.add(Model(owner=owner, name=name, aliases={}, last_number=0, created_at=utcnow()))
        session.flush()
        row = session.execute(increment).one()
    model_id, number = row
    version = ModelVersion(
        model_id=model_id,
        number=number,
        source_job_id=source_job_id,
        arch=arch,
        config=config,
        metrics=metrics,
        artifact_digest=artifact_digest,
        artifact_size=artifact_size,
        dataset_digest=dataset_digest,
        lineage=lineage or {},
        exports={},
        created_at=utcnow(),
        family=family,
        task=task,
    )
    session.add(version)
    session.flush()
    return version


def _locked(session: Session, model: Model) -> Model:
    """Re-read the model row FOR UPDATE, so concurrent alias moves apply one after another."""
    session.refresh(model, with_for_update=True)
    return model


def set_alias(session: Session, model: Model, alias: str, number: int) -> Model:
    """Point `alias` at version `number` (creating or moving it)."""
    if not _ALIAS.match(alias) or alias == "latest":
        raise InvalidRequest(
            "an alias is 1-63 letters, digits, '.', '_' or '-', starts with a letter, "
            "and is not 'latest'"
        )
    model = _locked(session, model)
    resolve_version(session, model, number)  # 404 unless the version exists
    # A new dict, not an in-place edit: JSON columns only notice reassignment.
    model.aliases = {**model.aliases, alias: number}
    session.flush()
    return model


def remove_alias(session: Session, model: Model, alias: str) -> Model:
    model = _locked(session, model)
    if alias not in model.aliases:
        raise NotFound(f"model {model.name!r} has no alias {alias!r}")
    model.aliases = {name: n for name, n in model.aliases.items() if name != alias}
    session.flush()
    return model


def delete_version(session: Session, model: Model, ref: str | int) -> list[str]:
    """Delete a version unless an alias points at it or a queued or running job may read it
    (InUse). Returns the digests of its files that nothing else refers to any more: the
    caller removes them after committing."""
    model = _locked(session, model)
    version = resolve_version(session, model, ref)
    pointing = sorted(alias for alias, n in model.aliases.items() if n == version.number)
    if pointing:
        raise InUse(
            f"version {version.number} of {model.name!r} is aliased as {', '.join(pointing)}; "
            "move or delete the alias first"
        )
    waiting = live_jobs_naming(session, model.owner, model.name, version.number)
    if waiting:
        raise InUse(
            f"queued or running jobs may use version {version.number} of {model.name!r} "
            f"({_shown(waiting)}); wait for them to finish or cancel them first"
        )
    digests = {version.artifact_digest, *(e["digest"] for e in version.exports.values())}
    session.delete(version)
    session.flush()
    return sorted(d for d in digests if not references.digest_in_use(session, d))


def delete_model(session: Session, model: Model) -> list[str]:
    """Delete a model and all its versions, refused (InUse) while an alias points at one of
    them or a queued or running job of its owner names the model. Returns the digests of
    their files that nothing else refers to any more: the caller removes them after
    committing."""
    model = _locked(session, model)
    if model.aliases:
        shown = ", ".join(f"{a} -> v{n}" for a, n in sorted(model.aliases.items()))
        raise InUse(f"model {model.name!r} has aliases ({shown}); delete them first")
    waiting = live_jobs_naming(session, model.owner, model.name)
    if waiting:
        raise InUse(
            f"queued or running jobs use model {model.name!r} ({_shown(waiting)}); "
            "wait for them to finish or cancel them first"
        )
    digests: set[str] = set()
    for version in model.versions:
        digests |= {version.artifact_digest, *(e["digest"] for e in version.exports.values())}
        session.delete(version)
    session.delete(model)
    session.flush()
    return sorted(d for d in digests if not references.digest_in_use(session, d))


def live_jobs_naming(
    session: Session, owner: str, name: str, number: int | None = None
) -> list[str]:
    """The ids of `owner`'s queued or running jobs whose spec reads model `name` (predict,
    batch_predict, optimize, export; a fine-tune's base model); with `number`, those that
    may read that version: all but the ones pinned to another number. (A job that names an
    alias or `latest` may have resolved it to this version already, and a resumed attempt
    keeps the version its first attempt resolved.)"""
    live = session.execute(
        select(Job.id, Job.spec)
        .where(Job.owner == owner, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
        .order_by(Job.created_at)
    )
    found = []
    for job_id, spec in live:
        refs = versions_read_by(spec).get(name)
        if refs and (number is None or _may_read(refs, number)):
            found.append(job_id)
    return found


def versions_read_by(spec: dict[str, Any]) -> dict[str, set[str | int]]:
    """The model names a stored spec reads versions of, each with the version refs it gives
    (a number, an alias, or `latest`)."""
    read: dict[str, set[str | int]] = {}
    pairs = [(spec.get("model"), spec.get("version", "latest"))]
    arch_params = spec.get("arch_params")
    if isinstance(arch_params, dict):
        pairs.append((arch_params.get("base_model"), arch_params.get("base_version", "latest")))
    for name, ref in pairs:
        if isinstance(name, str):
            read.setdefault(name, set()).add(ref if isinstance(ref, int | str) else "latest")
    return read


def _may_read(refs: set[str | int], number: int) -> bool:
    """Whether a job naming its model with these refs may read version `number`: unless
    every ref pins another number."""
    pinned = {int(ref) for ref in refs if isinstance(ref, int) or ref.isdecimal()}
    return len(pinned) < len(refs) or number in pinned


def _shown(job_ids: list[str]) -> str:
    return ", ".join(job_ids[:5]) + (" ..." if len(job_ids) > 5 else "")


def record_export(session: Session, version_id: str, fmt: str, digest: str, size: int) -> None:
    """Note on a version that its `fmt` export is stored under `digest`."""
    version = session.get(ModelVersion, version_id, with_for_update=True)
    if version is None:
        raise NotFound("the model version was deleted while it was being exported")
    version.exports = {**version.exports, fmt: {"digest": digest, "size": size}}
    session.flush()


def versions_trained_on(session: Session, dataset: Dataset) -> list[str]:
    """The owner's versions whose lineage names this dataset's file, as 'name vN'."""
    rows = session.execute(
        select(Model.name, ModelVersion.number)
        .join(ModelVersion.model)
        .where(Model.owner == dataset.owner, ModelVersion.dataset_digest == dataset.digest)
        .order_by(Model.name, ModelVersion.number)
    )
    return [f"{name} v{number}" for name, number in rows]


def get_owned(session: Session, model_id: str, owner: str | None) -> Model:
    """The model by id, if `owner` may see it (None: an admin sees all); otherwise NotFound.
    (get_model finds one by name in the caller's own namespace.)"""
    return owned.get_owned(session, Model, model_id, owner)


def listed(session: Session, owner: str | None) -> list[Model]:
    """The models `owner` may see (None: every owner's), by name."""
    return list(session.scalars(owned.visible(Model, owner, Model.name, Model.id)))
