"""A runner tested on its own: the predict runner with a fake RunContext, no database.

Runners reach the database only through their ctx (workers/context.py), so a test can hand
one a stand-in that serves a version, offers queued jobs to claim and records how the
claimed jobs ended."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from modelkit import FEATURES, LABELS, config

from kiln.artifacts import ArtifactStore
from kiln.errors import JobFailure
from kiln.settings import Settings
from kiln.specs import parse_spec
from workers import model_cache, runners
from workers.ml import bundle
from workers.runners import predict


@dataclass
class FakeContext:
    """What the predict runner uses of a RunContext, kept in memory."""

    runtime: Any
    version_row: Any
    queued: list[Any]
    job_id: str = "leader"
    owner: str = "alice"
    worker: str = "fake"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ended: dict[str, Any] = field(default_factory=dict)

    def version(self, model: str, ref: str | int) -> Any:
        assert (model, str(ref)) == ("m", "latest")
        return self.version_row

    def claim_followers(self, take, size, budget: int, limit: int) -> list[tuple]:
        claimed = []
        for job in list(self.queued):
            taken = take(job)
            if taken is not None and size(taken) <= budget:
                self.queued.remove(job)
                claimed.append((job.id, 1, taken))
                budget -= size(taken)
        return claimed

    def finish_followers(self, endings: list[tuple[str, int, Any]]) -> None:
        self.ended |= {job_id: ending for job_id, _, ending in endings}

    def fail_followers(self, held: list[tuple[str, int]], error_type: str, message: str) -> None:
        self.ended |= {job_id: error_type for job_id, _ in held}

    def raise_if_cancelled(self) -> None:
        pass


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[FakeContext]:
    settings = Settings(data_dir=tmp_path, database_url="sqlite://", redis_url="memory://")
    store = ArtifactStore(settings.artifacts_dir)
    cfg = config()
    torch.manual_seed(0)
    bundle.save(bundle.build(cfg).eval(), cfg, tmp_path / "w.safetensors")
    stored = store.put_file(tmp_path / "w.safetensors")
    runtime = SimpleNamespace(
        settings=settings, store=store, device_for=lambda _: torch.device("cpu")
    )
    version = SimpleNamespace(
        number=3, config=cfg, artifact_digest=stored.digest, family="zoo", task=None
    )
    queued = [
        SimpleNamespace(id="good", spec={"model": "m", "inputs": [[1, 2, 3, 4]]}),
        SimpleNamespace(id="bad", spec={"model": "m", "inputs": [[1, 2]]}),
        SimpleNamespace(id="other-model", spec={"model": "n", "inputs": [[1, 2, 3, 4]]}),
    ]
    model_cache.shared.cache_clear()
    yield FakeContext(runtime, version, queued)
    model_cache.shared.cache_clear()


def test_the_predict_runner_scores_its_followers_through_a_fake_ctx(ctx: FakeContext) -> None:
    spec = parse_spec("predict", {"model": "m", "inputs": [{n: 0.5 for n in FEATURES}]})

    result = predict.run(spec, ctx)  # type: ignore[arg-type]

    assert result["version"] == 3
    assert result["batch_jobs"] == 3  # the leader, "good" and "bad"; not the other model's
    assert result["predictions"][0]["label"] in LABELS
    assert ctx.ended["good"]["predictions"][0]["label"] in LABELS
    assert "has 2 values; the model takes 4" in ctx.ended["bad"]
    assert [job.id for job in ctx.queued] == ["other-model"]


def test_a_leader_with_bad_rows_fails_after_finishing_its_followers(ctx: FakeContext) -> None:
    spec = parse_spec("predict", {"model": "m", "inputs": [[1.0]]})

    with pytest.raises(JobFailure, match="has 1 values"):
        predict.run(spec, ctx)  # type: ignore[arg-type]

    assert set(ctx.ended) == {"good", "bad"}


def _runtime_imports(path: Path) -> set[str]:
    """The modules a file imports, leaving out those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_runner_reaches_the_database_but_through_its_ctx() -> None:
    folder = Path(runners.__file__).parent
    checked = sorted(folder.glob("*.py"))
    assert len(checked) >= 7
    for path in checked:
        direct = {m for m in _runtime_imports(path) if m == "db" or m.startswith("db.")}
        assert not direct, f"{path.name} imports {sorted(direct)}: use a RunContext method"
