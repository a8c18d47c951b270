"""Submit-time checks of what a spec names: the one place a job the registry already shows
to be doomed is refused (422 invalid_spec, naming the field) instead of queued to fail.

The spec models (kiln/specs.py) check a spec on its own; these checks read the caller's
rows: the model and version a job reads, the datasets it reads, the job it resumes from,
and what the version's family and task allow. Each check is one cheap indexed read.

The runners keep their own checks: an alias or `latest` may move, and a model or dataset
may be deleted, between submit and run, so a passing check here is no promise.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db import datasets, jobs, registry
from db.models import ModelVersion
from kiln.batch_retry import why_not_retryable
from kiln.errors import InvalidSpec, NotFound
from kiln.specs import (
    BatchPredictSpec,
    ExportSpec,
    HfTrainParams,
    OptimizeSpec,
    PredictSpec,
    Spec,
    TrainSpec,
)

#: The batch_predict output formats that can hold an embedding (a list of floats) per row.
_LIST_FORMATS = ("parquet", "jsonl", "arrow")
#: The hf tasks a fine-tune starts from (workers/runners/finetune.py BASE_TASKS).
_FINETUNE_BASE_TASKS = ("text-classification", "embedding")

Problem = tuple[tuple[str, ...], str]


def check_references(db: Session, owner: str, spec: Spec) -> None:
    """InvalidSpec naming each field whose reference `owner` cannot use; else nothing."""
    problems = _problems(db, owner, spec)
    if problems:
        details: list[dict[str, Any]] = [
            {"loc": ["spec", *loc], "msg": msg} for loc, msg in problems
        ]
        first = details[0]
        raise InvalidSpec(f"{'.'.join(first['loc'])}: {first['msg']}", details)


def _problems(db: Session, owner: str, spec: Spec) -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(spec, PredictSpec | BatchPredictSpec | OptimizeSpec | ExportSpec):
        version = _version(db, owner, spec.model, spec.version, ("model",), ("version",), problems)
        if version is not None:
            problems += _fits_version(spec, version)
    if isinstance(spec, BatchPredictSpec | OptimizeSpec) and spec.dataset is not None:
        problems += _dataset(db, owner, spec.dataset)
    if isinstance(spec, BatchPredictSpec) and spec.retry_of is not None:
        problems += _retry_source(db, owner, spec.retry_of)
    if isinstance(spec, TrainSpec):
        problems += _train_problems(db, owner, spec)
    return problems


def _train_problems(db: Session, owner: str, spec: TrainSpec) -> list[Problem]:
    problems: list[Problem] = []
    if not spec.dataset.startswith("builtin:"):
        problems += _dataset(db, owner, spec.dataset)
    if spec.resume_from is not None:
        try:
            jobs.get_owned(db, spec.resume_from, owner)
        except NotFound:
            problems.append((("resume_from",), f"you have no job {spec.resume_from!r}"))
    if isinstance(spec.arch_params, HfTrainParams):
        params = spec.arch_params
        base = _version(
            db,
            owner,
            params.base_model,
            params.base_version,
            ("arch_params", "base_model"),
            ("arch_params", "base_version"),
            problems,
        )
        if base is not None and (base.family != "hf" or base.task not in _FINETUNE_BASE_TASKS):
            problems.append(
                (
                    ("arch_params", "base_model"),
                    f"version {base.number} is a {base.family} {base.task or 'model'}; "
                    "fine-tuning starts from an hf text-classification or embedding version",
                )
            )
    return problems


def _version(
    db: Session,
    owner: str,
    name: str,
    ref: int | str,
    name_loc: tuple[str, ...],
    ref_loc: tuple[str, ...],
    problems: list[Problem],
) -> ModelVersion | None:
    """The owner's version, or None with the missing model or version added to problems."""
    try:
        model = registry.get_model(db, owner, name)
    except NotFound:
        problems.append((name_loc, f"you have no model {name!r}"))
        return None
    try:
        return registry.resolve_version(db, model, ref)
    except NotFound:
        problems.append((ref_loc, f"model {name!r} has no version {ref!r}"))
        return None


def _dataset(db: Session, owner: str, dataset_id: str) -> list[Problem]:
    try:
        datasets.get_owned(db, dataset_id, owner)
    except NotFound:
        return [(("dataset",), f"you have no dataset {dataset_id!r}")]
    return []


def _retry_source(db: Session, owner: str, source_id: str) -> list[Problem]:
    """A batch_predict's retry_of must name a job of the same owner that can be retried."""
    try:
        source = jobs.get_owned(db, source_id, owner)
    except NotFound:
        return [(("retry_of",), f"no job {source_id} of yours")]
    problem = why_not_retryable(source.id, source.kind, source.state, source.result)
    return [(("retry_of",), problem)] if problem is not None else []


def _fits_version(
    spec: PredictSpec | BatchPredictSpec | OptimizeSpec | ExportSpec, version: ModelVersion
) -> list[Problem]:
    """What the version's family and task rule out for this spec."""
    problems: list[Problem] = []
    hf = version.family == "hf"
    task = version.task or ""
    if isinstance(spec, PredictSpec | BatchPredictSpec) and spec.hf is not None:
        if not hf:
            problems.append(
                (
                    ("hf",),
                    f"model {spec.model!r} is a {version.family} model: "
                    "hf parameters are for hf models",
                )
            )
        else:
            problems += [
                (("hf", name), f"not a parameter of {task} models")
                for name in spec.hf.unused_for(task)
            ]
    if isinstance(spec, PredictSpec) and not hf and any(isinstance(r, str) for r in spec.inputs):
        problems.append(
            (
                ("inputs",),
                f"model {spec.model!r} is a {version.family} model: inputs are rows "
                "of numbers (or objects for a text arch); plain strings are for hf models",
            )
        )
    if isinstance(spec, BatchPredictSpec):
        if hf and spec.features is not None:
            problems.append(
                (("features",), "features are for zoo models; an hf model reads text_column")
            )
        if not hf and spec.text_column is not None:
            problems.append(
                (
                    ("text_column",),
                    f"model {spec.model!r} is a {version.family} "
                    "model: text_column is for hf models",
                )
            )
        if hf and task == "embedding" and spec.output_format not in _LIST_FORMATS:
            problems.append(
                (
                    ("output_format",),
                    f"an embedding is a list of numbers per row, which "
                    f"{spec.output_format} cannot hold: use {' or '.join(_LIST_FORMATS)}",
                )
            )
    return problems
