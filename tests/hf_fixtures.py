"""Fixtures the hf model tests share: import the ones a module needs, by name, so pytest
finds them in that module (`from tests.hf_fixtures import runtime  # noqa: F401`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from db import migrate
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings
from tests.hfkit import bert_directory, gpt2_directory
from workers import model_cache
from workers.runtime import Runtime


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: these tests are about the models and their files, not the database."""
    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="module")
def directories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random model directory per hf task."""
    root = tmp_path_factory.mktemp("hf")
    built = {
        task: bert_directory(root / task, task)
        for task in ("embedding", "text-classification", "token-classification")
    }
    built["text-generation"] = gpt2_directory(root / "gpt2")
    return built


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: the tiny models gain nothing from more, and the suite shares 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def runtime(settings: Settings, sessions) -> Iterator[Runtime]:
    """A worker's Runtime on the test's settings, with an empty model cache."""
    model_cache.shared.cache_clear()
    yield Runtime(settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir))
    model_cache.shared.cache_clear()
