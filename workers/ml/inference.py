"""Inference helpers: a network's outputs, class probabilities and regression values for a
feature matrix, in batches (the predict runner, and the training loop's evaluation)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: Rows per forward pass: bounds the memory one call takes on a large matrix.
_BATCH = 4096


@torch.no_grad()
def outputs(model: nn.Module, features: np.ndarray, device: torch.device) -> torch.Tensor:
    """The network's raw outputs for `features`, in batches, as float32 on the CPU."""
    was_training = model.training
    model.eval()
    parts = [
        model(torch.from_numpy(features[i : i + _BATCH]).to(device)).float().cpu()
        for i in range(0, len(features), _BATCH)
    ]
    model.train(was_training)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def predict_proba(model: nn.Module, features: np.ndarray, device: torch.device) -> np.ndarray:
    return torch.softmax(outputs(model, features, device), dim=1).numpy()


def predict_values(
    model: nn.Module,
    features: np.ndarray,
    device: torch.device,
    mean: float | list[float],
    std: float | list[float],
) -> np.ndarray:
    """Regression predictions in target units: rows by outputs (a multi-output model's
    mean and std are lists, one per output)."""
    values = outputs(model, features, device).double().numpy()
    return values * np.asarray(std, dtype=np.float64) + np.asarray(mean, dtype=np.float64)
