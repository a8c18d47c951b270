"""HTML forms generated from a job kind's spec: its fields, their defaults, and the way back.

Every form field is named by its dotted path in the spec ("arch_params.dropout"), so the
`loc` of a validation error (from kiln.specs.parse_spec) names the field it belongs beside.

A discriminated union of models (TrainSpec.arch_params: one params model per `arch`) gives
the fields of every member, each marked with the members it belongs to; only the chosen
member's fields are read back. web.ui.form_layout puts the chosen member's in view and the
others in a closed group (kiln-form.js moves them as the choice changes), so a plain form
without scripts still offers them all.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from werkzeug.datastructures import MultiDict

from kiln import safejson, specs
from kiln.errors import InvalidSpec, KilnError
from web.ui.form_layout import label_for

_SCALARS = (int, float, str)


@dataclass(frozen=True)
class Variant:
    """Where a field of one member of a discriminated union applies."""

    #: The input whose value picks the member: a sibling such as "arch", or the tag itself.
    selector: str
    #: The spec path of the union's discriminator ("arch_params.arch").
    tag: str
    #: The selector values (members) this field belongs to.
    values: tuple[str, ...]
    #: The member used when the selector is left empty (the union's default).
    fallback: str


@dataclass
class FormField:
    """One input of a job form."""

    name: str
    label: str
    #: text | number | select | checkbox | list | json | dataset | model | version | rows
    widget: str
    default: str = ""
    required: bool = False
    help: str = ""
    choices: list[str] = field(default_factory=list)
    step: str = "any"
    #: A select's typed value per choice, where the Literal is not of strings (3, not "3").
    choice_values: dict[str, Any] = field(default_factory=dict)
    variant: Variant | None = None


def builtin_datasets() -> tuple[str, ...]:
    """The built-in dataset names the specs accept."""
    # The specs keep this tuple private; a public name, once one exists, wins.
    found = getattr(specs, "BUILTIN_DATASETS", None) or getattr(specs, "_BUILTIN_DATASETS", ())
    return tuple(found or ())


def fields_for(spec_type: type[BaseModel], prefix: str = "") -> list[FormField]:
    """The form fields of a spec; nested models become dotted sub-fields."""
    fields: list[FormField] = []
    for name, info in spec_type.model_fields.items():
        path = f"{prefix}{name}"
        annotation = _unwrap(info.annotation)
        if _is_model(annotation):
            nested = fields_for(annotation, prefix=f"{path}.")
            if info.default is None:
                _leave_out_unless_filled(nested)
            fields.extend(nested)
        elif isinstance(info.discriminator, str) and _union_models(annotation):
            fields.extend(_union_fields(spec_type, prefix, path, info, info.discriminator))
        else:
            fields.append(_field(path, info, annotation))
    return fields


_YES_NO = {"yes": True, "no": False}


def _leave_out_unless_filled(fields: list[FormField]) -> None:
    """An optional group (PredictSpec.hf, say) starts blank, its defaults named in the
    hints: a form that prefilled them would send the group, and asking for it is not the
    same as leaving it out (a zoo version refuses hf parameters)."""
    for f in fields:
        if f.widget == "checkbox":  # an unticked box says "no"; a blank select says nothing
            f.help = f"{f.help} Default: {'yes' if f.default else 'no'}.".strip()
            f.widget, f.choices, f.choice_values = "select", ["yes", "no"], _YES_NO
        elif f.default:
            f.help = f"{f.help} Default: {f.default}.".strip()
        f.default = ""
        if f.widget == "select" and "" not in f.choices:
            f.choices = ["", *f.choices]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _either(values: tuple[str, ...]) -> str:
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _union_models(annotation: Any) -> list[type[BaseModel]]:
    members = [_unwrap(a) for a in get_args(annotation)] if _is_union(annotation) else []
    return members if members and all(_is_model(m) for m in members) else []


def _union_fields(
    parent: type[BaseModel], prefix: str, path: str, info: FieldInfo, discriminator: str
) -> list[FormField]:
    """Every member's fields under `path`, each tagged with the members that have it."""
    members = _union_models(_unwrap(info.annotation))
    default = info.get_default(call_default_factory=True)
    # The default member first, so a field several members share starts at its value.
    members.sort(key=lambda m: not isinstance(default, m))
    tags = {m: str(m.model_fields[discriminator].default) for m in members}
    fallback = tags[members[0]]
    # A sibling field of the same name (TrainSpec.arch) picks the member; else a select.
    has_sibling = discriminator in parent.model_fields
    selector = f"{prefix}{discriminator}" if has_sibling else f"{path}.{discriminator}"
    tag = f"{path}.{discriminator}"
    found: dict[str, FormField] = {}
    owners: dict[str, list[str]] = {}
    for member in members:
        for f in fields_for(member, prefix=f"{path}."):
            if f.name == tag:
                continue
            found.setdefault(f.name, f)
            owners.setdefault(f.name, []).append(tags[member])
    fields: list[FormField] = []
    if not has_sibling:
        fields.append(
            FormField(name=tag, label=label_for(tag),
                      widget="select", default=fallback, choices=list(tags.values()))
        )  # fmt: skip
    word = label_for(selector)
    for name, f in found.items():
        values = tuple(owners[name])
        f.variant = Variant(selector=selector, tag=tag, values=values, fallback=fallback)
        if len(values) < len(members):
            f.help = " ".join(filter(None, [f.help, f"Used when {word} is {_either(values)}."]))
        fields.append(f)
    return fields


def _field(path: str, info: FieldInfo, annotation: Any) -> FormField:
    default = info.get_default(call_default_factory=True)
    required = default is PydanticUndefined
    widget, choices, step = _widget(path, annotation)
    return FormField(
        name=path,
        label=label_for(path),
        widget=widget,
        default="" if required else to_text(widget, default),
        required=required,
        help=info.description or "",
        choices=choices,
        step=step,
        choice_values=_typed_choices(annotation) if widget == "select" else {},
    )


def _typed_choices(annotation: Any) -> dict[str, Any]:
    return {str(a): a for a in get_args(annotation) if not isinstance(a, str)}


def _named_widget(leaf: str, annotation: Any) -> str | None:
    """Fields whose name asks for a richer input than their type: pickers of the user's
    datasets, models and versions, and predict rows shown with the version's features."""
    if leaf in ("dataset", "model") and annotation is str:
        return leaf
    if leaf == "version" and _is_union(annotation):
        return "version"  # a number, an alias or "latest": picked per model
    if leaf == "inputs" and get_origin(annotation) is list:
        return "rows"
    return None


def _widget(path: str, annotation: Any) -> tuple[str, list[str], str]:
    if named := _named_widget(path.rsplit(".", 1)[-1], annotation):
        return named, [], "any"
    if get_origin(annotation) is Literal:
        return "select", [str(a) for a in get_args(annotation)], "any"
    if annotation is bool:
        return "checkbox", [], "any"
    if annotation is int:
        return "number", [], "1"
    if annotation is float:
        return "number", [], "any"
    if annotation is str:
        return "text", [], "any"
    if get_origin(annotation) is list and _unwrap(get_args(annotation)[0]) in _SCALARS:
        return "list", [], "any"
    if _is_union(annotation) and all(
        _unwrap(a) in _SCALARS or get_origin(a) is Literal for a in get_args(annotation)
    ):
        return "text", [], "any"  # e.g. version: a number or "latest"
    return "json", [], "any"


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type that picks the widget."""
    if get_origin(annotation) is Annotated:
        return _unwrap(get_args(annotation)[0])
    if _is_union(annotation):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def to_text(widget: str, value: Any) -> str:
    """A spec value as the text its input shows."""
    if value is None:
        return ""
    if widget == "checkbox":
        return "on" if value else ""
    if widget == "list":
        return ", ".join(str(v) for v in value)
    if widget in ("json", "rows"):
        return json.dumps(value, indent=2)
    return str(value)


def values_from_spec(fields: list[FormField], spec: dict[str, Any]) -> dict[str, str]:
    """The form's values for a stored spec (to resubmit a job)."""
    values: dict[str, str] = {}
    for f in fields:
        node: Any = spec
        for part in f.name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            values[f.name] = to_text(f.widget, node)
    return values


def spec_from_form(
    fields: list[FormField], form: MultiDict[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw spec a submitted form describes, and errors for inputs that are not even JSON.

    An empty input is left out, so the spec's default applies (or 'Field required' is
    reported for a field that has none).
    """
    raw: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for f in fields:
        text = form.get(f.name, "")
        value: Any
        if f.variant is not None:
            chosen = form.get(f.variant.selector, "").strip() or f.variant.fallback
            if chosen not in f.variant.values:
                continue  # another member's field: not part of this spec
            _put(raw, f.variant.tag.split("."), chosen)
        if f.widget == "checkbox":
            value = f.name in form
        elif not text.strip():
            continue
        elif f.widget == "list":
            value = [part.strip() for part in text.split(",") if part.strip()]
        elif f.widget in ("json", "rows"):
            try:
                value = safejson.loads(text, "this field")
            except KilnError as exc:
                errors[f.name] = exc.message
                continue
        elif f.widget == "version" and text.strip().isdecimal():
            value = int(text)  # a version number, not an alias made of digits
        else:
            value = f.choice_values.get(text.strip(), text.strip())
        _put(raw, f.name.split("."), value)
    return raw, errors


def _put(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def errors_by_field(fields: list[FormField], exc: InvalidSpec) -> tuple[dict[str, str], list[str]]:
    """Place each validation error beside the field its loc names; the rest go on top."""
    names = {f.name for f in fields}
    # pydantic names the member inside a union's loc (arch_params.mlp.hidden); the form does not.
    unions = {f.variant.tag.rsplit(".", 1)[0] for f in fields if f.variant is not None}
    placed: dict[str, str] = {}
    general: list[str] = []
    for detail in exc.details:
        loc = [str(part) for part in detail.get("loc", [])]
        if loc[:1] == ["spec"]:
            loc = loc[1:]
        loc = _without_member_tags(loc, unions)
        target = next(
            (".".join(loc[:n]) for n in range(len(loc), 0, -1) if ".".join(loc[:n]) in names),
            None,
        )
        message = str(detail.get("msg", "invalid"))
        if target is None:
            general.append(f"{'.'.join(loc) or 'spec'}: {message}")
        else:
            placed.setdefault(target, message)
    if not exc.details:
        general.append(exc.message)
    return placed, general


def _without_member_tags(loc: list[str], unions: set[str]) -> list[str]:
    """Drop the member name pydantic puts after a union's path in an error's loc."""
    kept: list[str] = []
    skip = False
    for part in loc:
        if skip:
            skip = False
            continue
        kept.append(part)
        skip = ".".join(kept) in unions
    return kept
