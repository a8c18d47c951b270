"""Kiln: an asynchronous job-queue backend for PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import kiln` (every server process does) does not load requests.
    if name == "Client":
        from kiln.client import Client

        return Client
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
