"""Model plugins: operator-installed architectures, found through the `kiln.models` entry
point group. Torch-free: the web reads a plugin's name, params schema and input kind from
here, and only workers import its builder (workers/ml/architectures.py).

A plugin package declares, in its pyproject.toml,

    [project.entry-points."kiln.models"]
    resnet = "kiln_plugin_resnet.kiln:PLUGIN"

where PLUGIN is a `ModelPlugin`. Installed plugins are discovered once per process, while
kiln.specs is first imported (so the module PLUGIN lives in may import kiln.plugins and
pydantic, but not kiln.specs); a plugin that cannot be loaded, or whose name is taken, is
skipped with a warning rather than taking the web down with it.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Literal

from pydantic import BaseModel

ENTRY_POINT_GROUP = "kiln.models"
InputKind = Literal["tabular", "image", "text"]
INPUT_KINDS: tuple[str, ...] = ("tabular", "image", "text")
#: Kiln's own architectures: a plugin cannot take their names.
ZOO_ARCHS = ("mlp", "cnn", "logreg", "text")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_BUILDER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPlugin:
    """What a plugin declares. `builder` is "package.module:function", called on workers as
    function(shape, outputs, **params) -> torch.nn.Module, like the zoo's builders: `shape`
    is one input row's shape ((features,) or (channels, height, width)), `outputs` the
    number of classes (1 for regression), `params` the validated `params` fields."""

    name: str
    #: A pydantic model of the architecture's parameters, importable without torch. It
    #: must not define `arch` (Kiln adds it) nor, for text plugins, `text_column`.
    params: type[BaseModel]
    input: InputKind
    builder: str
    description: str = ""


@dataclass(frozen=True)
class Installed:
    """A discovered plugin: its declaration and the distribution that installed it."""

    plugin: ModelPlugin
    distribution: str
    version: str


def check(plugin: object) -> ModelPlugin:
    """The declaration, checked; ValueError saying what is wrong."""
    if not isinstance(plugin, ModelPlugin):
        raise ValueError("the entry point must name a kiln.plugins.ModelPlugin")
    if not _NAME.match(plugin.name):
        raise ValueError(f"name {plugin.name!r} must be 1-32 of a-z, 0-9, '_', '-'")
    if plugin.name in (*ZOO_ARCHS, "hf"):  # hf: fine-tuning a registered hf version
        raise ValueError(f"name {plugin.name!r} is one of Kiln's own architectures")
    if not (isinstance(plugin.params, type) and issubclass(plugin.params, BaseModel)):
        raise ValueError("params must be a pydantic model class")
    reserved = {"arch"} | ({"text_column"} if plugin.input == "text" else set())
    if reserved & set(plugin.params.model_fields):
        raise ValueError(f"params must not define {', '.join(sorted(reserved))}")
    if plugin.input not in INPUT_KINDS:
        raise ValueError(f"input must be one of {', '.join(INPUT_KINDS)}")
    if not _BUILDER.match(plugin.builder):
        raise ValueError("builder must be a dotted path 'package.module:function'")
    return plugin


@functools.cache
def installed() -> dict[str, Installed]:
    """The installed plugins by name, discovered once per process."""
    found: dict[str, Installed] = {}
    for point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        dist = point.dist
        where = f"{point.name} = {point.value}" + (f" ({dist.name})" if dist else "")
        try:
            plugin = check(point.load())
        except Exception as exc:  # a broken plugin must not stop the web or a worker
            log.warning("skipping Kiln model plugin %s: %s", where, exc)
            continue
        if plugin.name in found:
            log.warning("skipping Kiln model plugin %s: name %r is taken", where, plugin.name)
            continue
        found[plugin.name] = Installed(
            plugin, dist.name if dist else "", dist.version if dist else ""
        )
    return found


def names() -> list[str]:
    return sorted(installed())


def get(name: str) -> Installed | None:
    return installed().get(name)


def describe_installed() -> str:
    """For error messages: the installed plugins, or that there are none."""
    found = names()
    return f"installed plugins: {', '.join(found)}" if found else "no plugins are installed"


def family_of(arch: str) -> str:
    """The family of a version built from `arch`: plugin for an installed plugin's, else zoo."""
    return "plugin" if arch in installed() else "zoo"


def version_note(arch: str) -> dict[str, str]:
    """What a plugin version records of the plugin it was made with (its config's `plugin`)."""
    found = get(arch)
    if found is None:
        return {}
    return {"name": arch, "distribution": found.distribution, "version": found.version}
