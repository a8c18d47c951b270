"""Per-process resources of a worker: settings, database sessions, artifact store, device."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_sessionmaker
from kiln.artifacts import ArtifactStore, open_store
from kiln.errors import JobFailure
from kiln.settings import Settings


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore

    def device_for(self, device_class: str) -> torch.device:
        """The device a job of this class runs on in this process.

        The launcher pinned this process to at most one GPU (CUDA_VISIBLE_DEVICES), so
        the GPU, if any, is always cuda:0 here; runners never choose devices themselves.
        """
        has_gpu = torch.cuda.is_available()
        if device_class == "gpu" and not has_gpu:
            raise JobFailure("the job asks for a GPU but this worker has none")
        if device_class == "cpu" or not has_gpu:
            return torch.device("cpu")
        return torch.device("cuda", 0)


@functools.cache
def runtime() -> Runtime:
    """This process's Runtime, built on first use (after fork, in the pool process)."""
    settings = Settings()
    return Runtime(
        settings=settings,
        sessions=make_sessionmaker(make_engine(settings.resolved_database_url)),
        store=open_store(settings),
    )
