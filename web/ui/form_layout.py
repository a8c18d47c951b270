"""How a job form is laid out for people: labels in words, what comes first, what is tucked
away under "Advanced", and the chaos switches that only some may see.

web.ui.forms derives the fields from a kind's spec; this module only orders and groups them,
so a new kind still gets a working form (its required fields first, the rest after).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # web.ui.forms labels its fields with label_for, below
    from web.ui.forms import FormField

#: Labels in words, by full path first, then by the field's last name.
_LABELS = {
    "model_name": "model name",
    "arch": "architecture",
    "target": "target column",
    "lr": "learning rate",
    "batch_size": "batch size",
    "weight_decay": "weight decay",
    "lr_schedule": "learning-rate schedule",
    "lr_step_epochs": "epochs per learning-rate step",
    "lr_gamma": "learning-rate step factor",
    "grad_clip": "gradient clipping (max norm)",
    "early_stopping_patience": "early-stopping patience (epochs)",
    "early_stopping_metric": "early-stopping metric",
    "val_fraction": "validation fraction",
    "seed": "random seed",
    "log_every_steps": "log the loss every N steps",
    "checkpoint_every_s": "checkpoint every (seconds)",
    "resume_from": "resume from job",
    "gpus": "GPUs (processes)",
    "hidden": "hidden layer sizes",
    "channels": "convolution channels",
    "kernel_size": "kernel size",
    "text_column": "text column",
    "inputs": "input rows",
    "features": "feature columns",
    "passthrough": "pass-through columns",
    "output_format": "output format",
    "probabilities": "write class probabilities",
    "max_error_fraction": "max fraction of bad rows",
    "chunk_rows": "rows per chunk",
    "sleep_s": "sleep (seconds)",
    "fail_with": "fail with message",
    "crash": "crash the worker (chaos test)",
    "hang_s": "hang (seconds, chaos test)",
}


def label_for(path: str) -> str:
    """A field's label in words: "learning rate", not "lr"."""
    leaf = path.rsplit(".", 1)[-1]
    return _LABELS.get(path) or _LABELS.get(leaf) or leaf.replace("_", " ")


@dataclass(frozen=True)
class Layout:
    """One kind's form: `first` fields in this order, then the union members' own fields
    (the chosen architecture's), then `main`; every other field goes under Advanced."""

    first: tuple[str, ...]
    main: tuple[str, ...] = ()
    #: The heading over `main` (none: it continues the first fields).
    main_title: str = ""


LAYOUTS: dict[str, Layout] = {
    "train": Layout(
        first=("model_name", "dataset", "target", "arch", "epochs"),
        main=("batch_size", "lr", "optimizer"),
        main_title="Training",
    ),
    "predict": Layout(first=("model", "version", "inputs")),
    "batch_predict": Layout(
        first=("model", "version", "dataset", "output_format"),
        main=("passthrough", "probabilities"),
    ),
    "optimize": Layout(first=("model", "version", "dataset", "target")),
    "export": Layout(first=("model", "version", "format")),
    "echo": Layout(first=("message", "sleep_s", "fail_with")),
}

#: Switches that only make a job kill or hang its worker (honoured only where KILN_CHAOS=1):
#: offered to an admin of a server that has chaos on, to nobody else.
CHAOS_FIELDS = {"echo": frozenset({"crash", "hang_s"})}


def offered(kind: str, fields: list[FormField], *, chaos: bool) -> list[FormField]:
    """The fields a form offers: without `chaos`, the chaos switches are left off (and so
    never read back: a forged post cannot set them)."""
    hidden = frozenset() if chaos else CHAOS_FIELDS.get(kind, frozenset())
    return [f for f in fields if f.name not in hidden]


@dataclass
class Group:
    """A run of fields shown together."""

    #: "first", "variant", "other-variants", "main" or "advanced" (the page's CSS and script
    #: hooks); "first" has no heading, nor "main" unless its layout names one.
    key: str
    title: str = ""
    fields: list[FormField] = field(default_factory=list)
    #: Shown as a closed <details> (opened where one of its fields has an error).
    collapsed: bool = False
    hint: str = ""
    #: How many of its fields differ from the spec's defaults (said on a closed group).
    changed: int = 0


def grouped(
    kind: str, fields: list[FormField], values: dict[str, str], errors: dict[str, str]
) -> list[Group]:
    """The form's fields in the groups it shows, in order; empty groups are left out,
    except the chosen member's (it says when the member has no fields of its own) and
    Advanced (the template adds the job's priority there)."""
    # Required fields first; a member's own required fields stay in the member's group.
    required = tuple(f.name for f in fields if f.required and f.variant is None)
    layout = LAYOUTS.get(kind) or Layout(first=required)
    by_name = {f.name: f for f in fields}
    plain = [f for f in fields if f.variant is None]
    variants = [f for f in fields if f.variant is not None]
    first = Group("first", fields=[by_name[n] for n in layout.first if n in by_name])
    placed = {f.name for f in first.fields}
    if kind in LAYOUTS:
        main = Group("main", layout.main_title, [by_name[n] for n in layout.main if n in by_name])
        placed |= {f.name for f in main.fields}
        advanced = Group(
            "advanced", "Advanced", [f for f in plain if f.name not in placed], collapsed=True
        )
    else:  # a kind with no layout: everything visible, required fields first
        main = Group("main", fields=[f for f in plain if f.name not in placed])
        advanced = Group("advanced", "Advanced", collapsed=True)
    groups = [first, *_variant_groups(variants, values), main, advanced]
    for group in groups:
        if group.collapsed and any(errors.get(f.name) for f in group.fields):
            group.collapsed = False
        group.changed = sum(values.get(f.name, f.default) != f.default for f in group.fields)
    return [g for g in groups if g.fields or g.key in ("variant", "advanced")]


def _variant_groups(variants: list[FormField], values: dict[str, str]) -> list[Group]:
    """The chosen member's fields, and the other members' (tucked away: without scripts a
    person who switches the architecture opens them; kiln-form.js moves the fields)."""
    if not variants:
        return []
    variant = variants[0].variant
    assert variant is not None
    leaf = variant.selector.rsplit(".", 1)[-1]
    chosen = values.get(variant.selector, "").strip() or variant.fallback
    mine = [f for f in variants if f.variant is not None and chosen in f.variant.values]
    others = [f for f in variants if f not in mine]
    word = label_for(leaf)
    return [
        Group(
            "variant",
            f"{word.capitalize()} parameters",
            mine,
            hint=f"This {word} has no parameters of its own." if not mine else "",
        ),
        Group(
            "other-variants",
            f"Parameters of other {word}s",
            others,
            collapsed=True,
            hint=f"Used only if you change the {word}.",
        ),
    ]


#: Kinds whose `dataset` may be a built-in one (builtin:digits...); the others read only
#: the user's uploads, so their picker offers no built-ins.
BUILTIN_DATASET_KINDS = frozenset({"train"})
