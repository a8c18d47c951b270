"""HTML forms generated from a job kind's spec: its fields, their defaults, and the way back.

Every form field is named by its dotted path in the spec ("arch_params.dropout"), so the
`loc` of a validation error (from kiln.specs.parse_spec) names the field it belongs beside.
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

from kiln import specs
from kiln.errors import InvalidSpec

_SCALARS = (int, float, str)


@dataclass
class FormField:
    """One input of a job form."""

    name: str
    label: str
    #: text | number | select | checkbox | list | json | dataset | model
    widget: str
    default: str = ""
    required: bool = False
    help: str = ""
    choices: list[str] = field(default_factory=list)
    step: str = "any"


def builtin_datasets() -> tuple[str, ...]:
    """The built-in dataset names the specs accept."""
    # The specs keep this tuple private; a public name, once one exists, wins.
    found = getattr(specs, "BUILTIN_DATASETS", None) or getattr(specs, "_BUILTIN_DATASETS", ())
    return tuple(found)


def fields_for(spec_type: type[BaseModel], prefix: str = "") -> list[FormField]:
    """The form fields of a spec; nested models become dotted sub-fields."""
    fields: list[FormField] = []
    for name, info in spec_type.model_fields.items():
        path = f"{prefix}{name}"
        annotation = _unwrap(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields.extend(fields_for(annotation, prefix=f"{path}."))
            continue
        fields.append(_field(path, info, annotation))
    return fields


def _field(path: str, info: FieldInfo, annotation: Any) -> FormField:
    default = info.get_default(call_default_factory=True)
    required = default is PydanticUndefined
    widget, choices, step = _widget(path, annotation)
    return FormField(
        name=path,
        label=path.replace("_", " ").replace(".", " · "),
        widget=widget,
        default="" if required else to_text(widget, default),
        required=required,
        help=info.description or "",
        choices=choices,
        step=step,
    )


def _widget(path: str, annotation: Any) -> tuple[str, list[str], str]:
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "dataset" and annotation is str:
        return "dataset", [], "any"
    if leaf == "model" and annotation is str:
        return "model", [], "any"
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
    if widget == "json":
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
        if f.widget == "checkbox":
            value = f.name in form
        elif not text.strip():
            continue
        elif f.widget == "list":
            value = [part.strip() for part in text.split(",") if part.strip()]
        elif f.widget == "json":
            try:
                value = json.loads(text)
            except ValueError as exc:
                errors[f.name] = f"not valid JSON: {exc}"
                continue
        else:
            value = text.strip()
        _put(raw, f.name.split("."), value)
    return raw, errors


def _put(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def errors_by_field(fields: list[FormField], exc: InvalidSpec) -> tuple[dict[str, str], list[str]]:
    """Place each validation error beside the field its loc names; the rest go on top."""
    names = {f.name for f in fields}
    placed: dict[str, str] = {}
    general: list[str] = []
    for detail in exc.details:
        loc = [str(part) for part in detail.get("loc", [])]
        if loc[:1] == ["spec"]:
            loc = loc[1:]
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
