"""The model zoo: each architecture is built from its params, the shape of one input row
and the number of outputs (classes, or 1 for regression)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn


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
    """Build `arch` (a name from the zoo) for rows of `shape` and `outputs` outputs."""
    try:
        builder = BUILDERS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}") from None
    own = {k: v for k, v in params.items() if k != "arch"}
    return builder(tuple(shape), outputs, **own)
