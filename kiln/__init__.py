"""Kiln: an asynchronous job-queue backend for PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.aclient import AsyncClient
    from kiln.client import Client
    from kiln.client_core import (
        ApiError,
        ClientError,
        JobCancelled,
        JobFailed,
        JobNotSucceeded,
        WaitTimeout,
    )

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "ClientError",
    "JobCancelled",
    "JobFailed",
    "JobNotSucceeded",
    "WaitTimeout",
]

#: Where each public name lives; imported on first use, so that `import kiln` (every
#: server process does) loads neither requests nor httpx.
_LAZY = {
    "AsyncClient": "kiln.aclient",
    "Client": "kiln.client",
    **{
        name: "kiln.client_core"
        for name in (
            "ApiError",
            "ClientError",
            "JobCancelled",
            "JobFailed",
            "JobNotSucceeded",
            "WaitTimeout",
        )
    },
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
