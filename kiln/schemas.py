"""API bodies: what clients send besides specs and what the API answers, as pydantic models.

The web serialises every response through these, and the OpenAPI document is generated from
them, so the documentation cannot drift from what is served.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kiln.specs import ARCH_PARAMS

#: What a client sends: unknown fields are errors and floats must be finite (NaN and inf are
#: refused as "finite number" errors, never stored as null).
_REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False)


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobSubmission(BaseModel):
    model_config = _REQUEST

    kind: str = Field(
        description="Job kind: train, predict, batch_predict, optimize, export or echo."
    )
    spec: dict[str, Any] = Field(default_factory=dict, description="The kind's parameters.")
    priority: int = Field(default=0, ge=0, le=9, description="0 (default) to 9 (most urgent).")
    preemptible: bool = Field(
        default=True,
        description="Whether a bulk job may be stopped (and later resumed where it stopped) "
        "for a waiting job of higher priority; false opts out.",
    )


class JobError(BaseModel):
    type: str
    message: str


class ShardOut(BaseModel):
    """One shard (a child job) of a sharded batch_predict job."""

    id: str
    index: int
    state: str
    rows: int = Field(description="Rows of the dataset this shard scores.")
    rows_done: int


class JobOut(Out):
    id: str
    kind: str
    state: str
    owner: str
    spec: dict[str, Any]
    priority: int
    queue: str
    preemptible: bool
    preemptions: int
    progress: float
    message: str
    attempt: int
    cancel_requested: bool
    worker: str | None
    device: str | None
    result: dict[str, Any] | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    parent_id: str | None = Field(
        default=None, description="Of a shard: the sharded job it scores a range of rows for."
    )
    shard_index: int | None = None
    shards: list[ShardOut] | None = Field(
        default=None,
        description="Of a sharded job that split (read one job to see them): its shards, in "
        "order; list them as jobs with GET /api/v1/jobs?parent=<id>.",
    )


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next, older page.")


class MetricPoint(BaseModel):
    step: int
    value: float
    at: datetime


class MetricSeries(BaseModel):
    job_id: str
    series: dict[str, list[MetricPoint]]


class EventOut(Out):
    id: int
    at: datetime
    level: str
    message: str


class EventPage(BaseModel):
    events: list[EventOut]


class ModelVersionOut(Out):
    number: int
    arch: str
    config: dict[str, Any]
    feature_names: list[str] = Field(description="Input schema: a row's features, in order.")
    label_names: list[str]
    metrics: dict[str, float]
    source_job_id: str | None
    lineage: dict[str, Any] = Field(
        description="origin (train, upload, optimize), the job's spec, source_version."
    )
    artifact_digest: str
    artifact_size: int
    dataset_digest: str | None
    exports: dict[str, dict[str, Any]] = Field(
        description="Stored exports by format (made by export jobs): digest and size."
    )
    created_at: datetime
    family: str = Field(
        default="zoo",
        description="zoo (Kiln's architectures), hf (a transformers directory), plugin (an "
        "installed plugin's architecture, named by arch).",
    )
    task: str | None = Field(default=None, description="An hf version's task.")


class ModelOut(Out):
    name: str
    owner: str
    aliases: dict[str, int]
    created_at: datetime
    versions: list[ModelVersionOut]


class ModelList(BaseModel):
    models: list[ModelOut]


class AliasRequest(BaseModel):
    model_config = _REQUEST

    version: int = Field(ge=1, description="The version number the alias points at.")


class ModelConfigIn(BaseModel):
    """The JSON config uploaded beside a safetensors file: what Kiln needs to rebuild the
    network (an architecture from the zoo) and to read rows and name its outputs."""

    model_config = _REQUEST

    arch: str = Field(description="An architecture of Kiln's zoo, e.g. 'mlp'.")
    arch_params: dict[str, Any] = Field(default_factory=dict)
    task: Literal["classification", "regression"] = "classification"
    feature_names: list[str] = Field(min_length=1, max_length=100_000)
    label_names: list[str] = Field(
        default_factory=list,
        max_length=100_000,
        description="Class names in output order (classification); none for regression.",
    )
    # A config downloaded from a trained version carries these too, so it uploads as is.
    # Text models embed with an encoder the config names; their upload is not supported.
    input: Literal["features"] = "features"
    input_shape: list[int] | None = Field(default=None, max_length=8)
    target_mean: float | None = Field(
        default=None, description="Regression: predictions are scaled back by mean and std."
    )
    target_std: float | None = Field(default=None, gt=0)
    plugin: dict[str, str] | None = Field(
        default=None, description="Set by Kiln for plugin versions; ignored on upload."
    )

    @field_validator("feature_names", "label_names")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("names must be distinct")
        return names

    @field_validator("label_names")
    @classmethod
    def _labels_fit_task(cls, names: list[str], info: ValidationInfo) -> list[str]:
        task = info.data.get("task", "classification")
        if task == "classification" and len(names) < 2:
            raise ValueError("a classification model needs at least 2 label_names")
        if task == "regression" and names:
            raise ValueError("a regression model has no label_names")
        return names

    @model_validator(mode="after")
    def _regression_scale(self) -> ModelConfigIn:
        if self.task == "regression":  # a network trained on raw targets: identity scaling
            self.target_mean = 0.0 if self.target_mean is None else self.target_mean
            self.target_std = 1.0 if self.target_std is None else self.target_std
        return self

    @model_validator(mode="after")
    def _known_arch(self) -> ModelConfigIn:
        params = ARCH_PARAMS.get(self.arch)
        if params is None:
            raise ValueError(f"unknown arch {self.arch!r}; known: {', '.join(ARCH_PARAMS)}")
        # Defaults filled in, so the stored config says exactly what will be built.
        # The arch discriminator lives beside the params, as training stores it.
        checked = params.model_validate({**self.arch_params, "arch": self.arch})
        self.arch_params = checked.model_dump(exclude={"arch"})
        return self


class ColumnOut(BaseModel):
    name: str
    dtype: str


class DatasetOut(Out):
    id: str
    name: str
    owner: str
    format: str
    rows: int
    columns: list[ColumnOut]
    size_bytes: int
    digest: str
    created_at: datetime


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class KeyRequest(BaseModel):
    model_config = _REQUEST

    owner: str = Field(min_length=1, max_length=100)
    role: str = Field(default="user", pattern="^(admin|user)$")


class KeyOut(Out):
    id: str
    prefix: str
    owner: str
    role: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str = Field(description="The key itself; shown this once and never stored in clear.")


class KeyList(BaseModel):
    keys: list[KeyOut]


class ProblemDetail(BaseModel):
    loc: list[str]
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details, with Kiln's machine-readable `code`."""

    type: str = "about:blank"
    title: str
    status: int
    code: str
    detail: str
    errors: list[ProblemDetail] = Field(default_factory=list)


class ScheduleRequest(BaseModel):
    """A cron schedule that submits a job from this template."""

    model_config = _REQUEST

    name: str = Field(min_length=1, max_length=100)
    cron: str = Field(
        max_length=100, description="Five-field cron expression in UTC, e.g. '0 2 * * *'."
    )
    kind: str = Field(description="Job kind of the template, as in POST /jobs.")
    spec: dict[str, Any] = Field(default_factory=dict, description="The kind's parameters.")
    priority: int = Field(default=0, ge=0, le=9)
    enabled: bool = True


class ScheduleOut(Out):
    id: str
    owner: str
    name: str
    cron: str
    kind: str
    spec: dict[str, Any]
    priority: int
    enabled: bool
    next_run_at: datetime | None = Field(description="When it fires next; null while paused.")
    last_run_at: datetime | None
    last_job_id: str | None
    created_at: datetime
    upcoming: list[datetime] = Field(
        default_factory=list, description="The next few run times (UTC)."
    )


class ScheduleList(BaseModel):
    schedules: list[ScheduleOut]
