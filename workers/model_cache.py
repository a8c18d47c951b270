"""Keep recently used model versions loaded on this worker's device (LRU by count and bytes).

A worker process serves one device, so the cache is per process: the second predict on a
version finds it loaded and skips reading and moving the weights. Entries are keyed by the
weights' digest (content address) and the device, so two names for one file share an entry.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers import metrics
from workers.context import RunContext
from workers.ml import bundle

DEFAULT_MAX_MODELS = 8
DEFAULT_MAX_BYTES = 2 * 1024**3


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


def model_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold on its device."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """An LRU of loaded models, bounded by how many and by their total bytes."""

    def __init__(
        self, max_models: int = DEFAULT_MAX_MODELS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models, self.max_bytes = max_models, max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, str], tuple[nn.Module, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, digest: str, device: torch.device, load: Callable[[], nn.Module]
    ) -> tuple[nn.Module, bool]:
        """The model for `digest` on `device`, and whether it was loaded already (`load` is
        called only on a miss)."""
        key = (digest, str(device))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return self._entries[key][0], True
            self.stats.misses += 1
            model = load()
            self._entries[key] = (model, model_bytes(model))
            self._evict()
            return model, False

    def _evict(self) -> None:
        # The newest entry always stays, even when it alone is over the byte budget.
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_models or self.loaded_bytes > self.max_bytes
        ):
            self._entries.popitem(last=False)
            self.stats.evictions += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give evicted weights back to other processes

    @property
    def loaded_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@functools.cache
def shared(max_models: int = DEFAULT_MAX_MODELS, max_bytes: int = DEFAULT_MAX_BYTES) -> ModelCache:
    """This process's cache (a worker process serves one device)."""
    return ModelCache(max_models, max_bytes)


def load_version(
    ctx: RunContext, digest: str, config: dict[str, Any]
) -> tuple[nn.Module, torch.device]:
    """A registered version's model ready to score on the job's device, and the device it
    runs on (the CPU for a quantized version), from the cache when loaded."""
    settings = ctx.runtime.settings
    cache = shared(settings.model_cache_models, settings.model_cache_bytes)
    target = bundle.inference_device(config, ctx.device)
    path = ctx.runtime.store.path(digest)
    model, hit = cache.get(
        digest, target, lambda: bundle.load_for_inference(path, config, target)[0]
    )
    metrics.record_model_cache(ctx.worker, hit)
    return model, target
