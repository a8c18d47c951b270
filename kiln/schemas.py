"""API bodies: what clients send besides specs and what the API answers, as pydantic models.

The web serialises every response through these, and the OpenAPI document is generated from
them, so the documentation cannot drift from what is served.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kiln import egress, webhooks
from kiln.errors import FieldProblem
from kiln.retention import MAX_EXPIRES_AFTER_S, MIN_EXPIRES_AFTER_S
from kiln.specs import ARCH_PARAMS
from kiln.tags import MAX_TAGS, TagKey, TagValue

#: The longest deadline_s a job may ask for: 30 days, past any job worth a deadline.
MAX_DEADLINE_S = 30 * 24 * 3600.0

#: What a client sends: unknown fields are errors and floats must be finite (NaN and inf are
#: refused as "finite number" errors, never stored as null).
_REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False)


def _not_a_bool(value: Any) -> Any:
    """JSON true/false are not numbers (pydantic would take true as 1)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


#: A submission's whole-number and number fields: as int/float, but true/false refused.
WholeNumber = Annotated[int, BeforeValidator(_not_a_bool)]
Number = Annotated[float, BeforeValidator(_not_a_bool)]


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class WebhookFields(BaseModel):
    """A job's (or a schedule's job template's) webhook, beside kind and spec
    (docs/webhooks.md). Only the URL's form is checked here; where it points is checked
    against the operator's policy by the web (kiln.egress), and again at every delivery."""

    webhook_url: str | None = Field(
        default=None,
        max_length=webhooks.MAX_URL_LENGTH,
        description="An http(s) URL to POST the job's events to, signed per Standard Webhooks "
        "with the owner's secret (GET /api/v1/webhooks/secret). Private and loopback "
        "addresses are refused unless the operator allows them.",
    )
    webhook_events: list[webhooks.Event] | None = Field(
        default=None,
        min_length=1,
        description="Which events to send (default: succeeded, failed, cancelled). progress "
        "events come at most every 5 s, when the whole percent changed.",
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            egress.check_syntax(url)  # egress.Refused is a ValueError: a field error
        return url

    @field_validator("webhook_events")
    @classmethod
    def _distinct_events(cls, events: list[str] | None) -> list[str] | None:
        if events is not None and len(set(events)) != len(events):
            raise ValueError("events must be distinct")
        return events

    @model_validator(mode="after")
    def _events_need_a_url(self) -> WebhookFields:
        if self.webhook_events is not None and self.webhook_url is None:
            raise FieldProblem("webhook_events", "needs a webhook_url")
        return self

    @property
    def webhook(self) -> webhooks.Webhook | None:
        """The webhook asked for, with the default events filled in; None if none."""
        if self.webhook_url is None:
            return None
        events = tuple(self.webhook_events or webhooks.DEFAULT_EVENTS)
        return webhooks.Webhook(self.webhook_url, events)


class JobSubmission(WebhookFields):
    model_config = _REQUEST

    kind: str = Field(
        description="Job kind: train, predict, batch_predict, optimize, export or echo."
    )
    spec: dict[str, Any] = Field(default_factory=dict, description="The kind's parameters.")
    priority: WholeNumber = Field(
        default=0, ge=0, le=9, description="0 (default) to 9 (most urgent)."
    )
    preemptible: bool = Field(
        default=True,
        description="Whether a bulk job may be stopped (and later resumed where it stopped) "
        "for a waiting job of higher priority; false opts out.",
    )
    expires_after: WholeNumber | None = Field(
        default=None,
        ge=MIN_EXPIRES_AFTER_S,
        le=MAX_EXPIRES_AFTER_S,
        description="Seconds after the job finishes that its output files and log lines are "
        "kept (60 to 3650 days' worth); default KILN_RETENTION_DAYS (30 days).",
    )
    tags: dict[TagKey, TagValue] = Field(
        default_factory=dict,
        max_length=MAX_TAGS,
        description=f"Up to {MAX_TAGS} key-value labels (team: nlp); list jobs by them with "
        "GET /jobs?tag=team:nlp. Keys: 1-64 letters, digits, _ . - /; values: 1-128 of "
        "those or : @ +.",
    )
    deadline_s: Number | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE_S,
        description="Seconds from submission after which the job is cancelled: a queued "
        "job never starts, a running one stops at its next step (the job's error says "
        "'deadline of N s passed'). Separate from the server's KILN_JOB_TIME_LIMIT_S.",
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
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    deadline_s: float | None = None
    deadline_at: datetime | None = Field(
        default=None, description="created_at + deadline_s: when the job is cancelled."
    )
    queue_position: int | None = Field(
        default=None,
        description="While queued, when read alone (GET /jobs/<id>): 1 when it is next on "
        "its queue; jobs of higher priority, then older ones, go first.",
    )
    estimated_start_at: datetime | None = Field(
        default=None,
        description="While queued, when read alone: when it should start, from the recent "
        "durations of the jobs ahead of it and the workers serving its queue; null when "
        "no durations are recorded yet.",
    )
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    expires_after: int | None = Field(
        default=None,
        validation_alias=AliasChoices("expires_after_s", "expires_after"),
        description="Seconds its outputs and log lines are kept after it finishes.",
    )
    expires_at: datetime | None = Field(
        default=None, description="When its outputs and log lines go (set when it finishes)."
    )
    expired: bool = Field(
        default=False,
        description="The sweeper removed its output files, log lines and scratch; the job "
        "stays as a record (spec, result, error, metrics).",
    )
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


class WorkerJob(BaseModel):
    """The job a worker runs now, from the job's row."""

    id: str
    kind: str
    state: str
    progress: float
    attempt: int
    started_at: datetime | None
    heartbeat_at: datetime | None


class WorkerOut(BaseModel):
    """A live worker process (its presence record in Redis; kiln/presence.py)."""

    name: str = Field(description="Celery's name for it: gpu0@host, cpu0-i0@host.")
    host: str
    pid: int
    lane: str = Field(description="bulk or interactive.")
    devices: list[str] = Field(
        description="gpu<n> for each GPU it may use, cpu for none, all when it was started "
        "without CUDA_VISIBLE_DEVICES."
    )
    queues: list[str] = Field(description="The queues it consumes, in the order it takes them.")
    concurrency: int
    started_at: datetime
    heartbeat_at: datetime = Field(description="When it last wrote its presence record.")
    heartbeat_age_s: float = Field(description="Seconds since heartbeat_at, at the answer.")
    job: WorkerJob | None = Field(description="The job it runs now; null when idle.")


class WorkerList(BaseModel):
    workers: list[WorkerOut]


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


class ScheduleRequest(WebhookFields):
    """A cron schedule that submits a job from this template."""

    model_config = _REQUEST

    name: str = Field(min_length=1, max_length=100)
    cron: str = Field(
        max_length=100, description="Five-field cron expression in UTC, e.g. '0 2 * * *'."
    )
    kind: str = Field(description="Job kind of the template, as in POST /jobs.")
    spec: dict[str, Any] = Field(default_factory=dict, description="The kind's parameters.")
    priority: WholeNumber = Field(default=0, ge=0, le=9)
    enabled: bool = True
    tags: dict[TagKey, TagValue] = Field(
        default_factory=dict, max_length=MAX_TAGS, description="Tags of each job it submits."
    )
    deadline_s: Number | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE_S,
        description="Each job it submits is cancelled this many seconds after it was queued.",
    )
    expires_after: WholeNumber | None = Field(
        default=None,
        ge=MIN_EXPIRES_AFTER_S,
        le=MAX_EXPIRES_AFTER_S,
        description="Seconds each job it submits keeps its output files and log lines after "
        "it finishes, as in POST /jobs; default KILN_RETENTION_DAYS.",
    )


class ScheduleOut(Out):
    id: str
    owner: str
    name: str
    cron: str
    kind: str
    spec: dict[str, Any]
    priority: int
    enabled: bool
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    deadline_s: float | None = None
    expires_after: int | None = Field(
        default=None,
        validation_alias=AliasChoices("expires_after_s", "expires_after"),
        description="Seconds each job it submits keeps its outputs and log lines.",
    )
    next_run_at: datetime | None = Field(description="When it fires next; null while paused.")
    last_run_at: datetime | None
    last_job_id: str | None
    created_at: datetime
    upcoming: list[datetime] = Field(
        default_factory=list, description="The next few run times (UTC)."
    )

    @field_validator("tags", mode="before")
    @classmethod
    def _no_tags(cls, tags: dict[str, str] | None) -> dict[str, str]:
        return tags or {}  # schedules made before tags existed hold NULL


class ScheduleList(BaseModel):
    schedules: list[ScheduleOut]


class DeliveryAttemptOut(Out):
    """One attempt to deliver a webhook message."""

    number: int = Field(description="1 for the first attempt.")
    at: datetime = Field(description="When the attempt started (or, for a lost one, was found).")
    outcome: Literal["delivered", "failed"] = Field(
        description="delivered: the receiver answered 2xx; failed: anything else."
    )
    status_code: int | None = Field(description="The receiver's HTTP status; null: no answer.")
    latency_ms: float | None
    error: str | None = Field(description="Why the attempt failed (a timeout, a refusal…).")


class WebhookMessageOut(Out):
    """One event of a job and its delivery so far."""

    id: str = Field(description="The webhook-id header: the same on every attempt.")
    event: str
    url: str
    state: Literal["pending", "delivered", "failed"] = Field(
        description="pending (to be tried, again), delivered, or failed (given up)."
    )
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When it is tried next, if pending.")
    delivered_at: datetime | None
    deliveries: list[DeliveryAttemptOut]


class DeliveryList(BaseModel):
    job_id: str
    messages: list[WebhookMessageOut]


class WebhookSecretOut(BaseModel):
    """The caller's webhook signing secret (a receiver verifies with it)."""

    secret: str = Field(description="whsec_… : signs every delivery.")
    previous_secret: str | None = Field(
        description="The secret before the last rotation, still signing (a second "
        "signature in webhook-signature) until previous_valid_until."
    )
    previous_valid_until: datetime | None
    rotated_at: datetime | None
