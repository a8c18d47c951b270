"""The model zoo: each architecture is built from its params, the shape of one input row
and the number of outputs (classes, or 1 for regression). Installed plugins' architectures
(kiln/plugins.py) are built the same way, by their own builders, imported here on first use."""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from kiln import plugins
from kiln.errors import JobFailure


def mlp(shape: Sequence[int], outputs: int, hidden: list[int], dropout: float) -> nn.Module:
    """Linear-ReLU-Dropout blocks over the flattened input."""
    # Flatten only image rows, so flat models keep the weight names bundles already use.
    layers: list[nn.Module] = [nn.Flatten()] if len(shape) > 1 else []
    width = math.prod(shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def logreg(shape: Sequence[int], outputs: int) -> nn.Module:
    """One linear layer (softmax regression, or linear regression for one output)."""
    return mlp(shape, outputs, hidden=[], dropout=0.0)


def text(
    shape: Sequence[int], outputs: int, text_column: str, hidden: list[int], dropout: float
) -> nn.Module:
    """A head over sentence embeddings; the embeddings are computed outside the network."""
    return mlp(shape, outputs, hidden, dropout)


def cnn(
    shape: Sequence[int], outputs: int, channels: list[int], kernel_size: int, dropout: float
) -> nn.Module:
    """Conv-BN-ReLU blocks, max-pooled while the image is at least 4 pixels wide."""
    if len(shape) != 3:
        raise ValueError(f"cnn needs image rows (channels, height, width); got shape {shape}")
    layers: list[nn.Module] = []
    width, size = shape[0], min(shape[1:])
    for out in channels:
        layers += [
            nn.Conv2d(width, out, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm2d(out),
            nn.ReLU(),
        ]
        if size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        width = out
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(width, outputs),
    ]
    return nn.Sequential(*layers)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "logreg": logreg,
    "text": text,
}


def build(arch: str, params: dict[str, Any], shape: Sequence[int], outputs: int) -> nn.Module:
    """Build `arch` (a name from the zoo, or an installed plugin's) for rows of `shape` and
    `outputs` outputs. ValueError when the arch cannot take such rows; JobFailure when it is
    a plugin this worker cannot load."""
    own = {k: v for k, v in params.items() if k != "arch"}
    builder = BUILDERS.get(arch)
    if builder is None:
        plugin = _plugin(arch)
        _check_input(plugin, shape)
        own.pop("text_column", None)  # Kiln embeds the column; the network sees vectors
        return _plugin_builder(plugin.builder)(tuple(shape), outputs, **own)
    return builder(tuple(shape), outputs, **own)


def _plugin(arch: str) -> plugins.ModelPlugin:
    found = plugins.get(arch)
    if found is None:
        raise JobFailure(
            f"this worker cannot build architecture {arch!r}: it is not one of Kiln's own "
            f"and no such model plugin is installed here ({plugins.describe_installed()}); "
            "install the plugin's package on every worker and restart them"
        )
    return found.plugin


def _check_input(plugin: plugins.ModelPlugin, shape: Sequence[int]) -> None:
    """Image plugins take (channels, height, width) rows; the others flat vectors."""
    if plugin.input == "image" and len(shape) != 3:
        raise ValueError(
            f"plugin {plugin.name!r} takes image rows (channels, height, width), such as "
            f"builtin:digits_images; this dataset's rows have shape {tuple(shape)}"
        )
    if plugin.input != "image" and len(shape) != 1:
        raise ValueError(
            f"plugin {plugin.name!r} takes {plugin.input} rows (a flat vector); this "
            f"dataset's rows have shape {tuple(shape)}"
        )


@functools.cache
def _plugin_builder(path: str) -> Callable[..., nn.Module]:
    """The builder a plugin names ("package.module:function"), imported on first use."""
    module_name, _, attribute = path.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # the plugin is installed but broken on this worker
        raise JobFailure(f"cannot load the model plugin's builder {path}: {exc}") from None
    if not callable(builder):
        raise JobFailure(f"the model plugin's builder {path} is not callable")
    return builder
