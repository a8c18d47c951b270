"""The worker's model cache and dynamic batching of queued predict jobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from modelkit import FEATURES, LABELS, never_resent, register_model
from prometheus_client import REGISTRY

from db import jobs
from db.models import Job
from kiln.artifacts import ArtifactStore
from workers import model_cache
from workers.execute import execute_attempt
from workers.model_cache import ModelCache
from workers.runtime import Runtime

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def runtime(settings, sessions):
    model_cache.shared.cache_clear()
    yield Runtime(settings=settings, sessions=sessions, store=ArtifactStore(settings.artifacts_dir))
    model_cache.shared.cache_clear()


def _submit(sessions, spec: dict, owner: str = "alice") -> str:
    with sessions() as session:
        job = jobs.create(session, kind="predict", owner=owner, spec=spec, queue="cpu")
        session.commit()
        return job.id


def _job(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def _cache_requests(worker: str, result: str) -> float:
    labels = {"worker": worker, "result": result}
    return REGISTRY.get_sample_value("kiln_model_cache_requests_total", labels) or 0.0


def _labels(model, rows) -> list[str]:
    with torch.inference_mode():
        best = model(torch.tensor(rows, dtype=torch.float32)).argmax(dim=1)
    return [LABELS[i] for i in best.tolist()]


def test_the_cache_loads_once_and_evicts_the_least_recently_used(database_url):
    cache = ModelCache(max_models=2)
    loads: list[str] = []

    def loader(name: str):
        return lambda: loads.append(name) or torch.nn.Linear(2, 2)

    cpu = torch.device("cpu")
    first, was_loaded = cache.get("a", cpu, loader("a"))
    again, hit = cache.get("a", cpu, loader("a"))
    cache.get("b", cpu, loader("b"))
    cache.get("a", cpu, loader("a"))  # a is now the most recently used
    cache.get("c", cpu, loader("c"))  # evicts b
    cache.get("b", cpu, loader("b"))

    assert again is first
    assert (was_loaded, hit) == (False, True)
    assert loads == ["a", "b", "c", "b"]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 4, 2)


def test_the_cache_keeps_its_bytes_under_the_budget(database_url):
    one_model = model_cache.model_bytes(torch.nn.Linear(10, 10))
    cache = ModelCache(max_models=10, max_bytes=2 * one_model)
    cpu = torch.device("cpu")

    for name in "abc":
        cache.get(name, cpu, lambda: torch.nn.Linear(10, 10))

    assert len(cache) == 2
    assert cache.loaded_bytes == 2 * one_model


def test_the_second_predict_on_a_version_is_a_cache_hit(runtime, sessions, tmp_path):
    model, _ = register_model(sessions, runtime.store, tmp_path)
    rows = [[0.1, 0.2, 0.3, 0.4]]
    first = _submit(sessions, {"model": "m", "inputs": rows})
    execute_attempt(runtime, first, 0, "w1", never_resent)
    second = _submit(sessions, {"model": "m", "version": 1, "inputs": rows})

    hits_before = _cache_requests("w1", "hit")
    execute_attempt(runtime, second, 0, "w1", never_resent)

    stats = model_cache.shared(8, runtime.settings.model_cache_bytes).stats
    assert (stats.misses, stats.hits) == (1, 1)
    assert _cache_requests("w1", "hit") == hits_before + 1  # the worker's metric counts it
    assert _job(sessions, second).result["predictions"][0]["label"] == _labels(model, rows)[0]


def test_waiting_jobs_for_the_same_version_share_one_forward_pass(runtime, sessions, tmp_path):
    model, _ = register_model(sessions, runtime.store, tmp_path)
    register_model(sessions, runtime.store, tmp_path, name="other")
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(n, 4)).round(3).tolist() for n in (1, 3, 2, 1)]
    ids = [_submit(sessions, {"model": "m", "inputs": rows}) for rows in inputs]
    by_name = _submit(
        sessions, {"model": "m", "inputs": [dict(zip(FEATURES, inputs[0][0], strict=True))]}
    )
    bad = _submit(sessions, {"model": "m", "inputs": [[1.0, 2.0]]})
    elsewhere = _submit(sessions, {"model": "other", "inputs": inputs[0]})
    bobs = _submit(sessions, {"model": "m", "inputs": inputs[0]}, owner="bob")
    cancelled = _submit(sessions, {"model": "m", "inputs": inputs[0]})
    with sessions() as session:
        jobs.request_cancel(session, session.get(Job, cancelled))
        session.commit()

    execute_attempt(runtime, ids[0], 0, "w1", never_resent)

    for job_id, rows in zip([*ids, by_name], [*inputs, inputs[:1][0][:1]], strict=True):
        job = _job(sessions, job_id)
        assert (job.state, job.attempt) == ("succeeded", 1)
        assert [p["label"] for p in job.result["predictions"]] == _labels(model, rows)
    assert _job(sessions, ids[0]).result["batch_jobs"] == 6
    assert _job(sessions, ids[2]).result["batched_with"] == ids[0]
    failed = _job(sessions, bad)
    assert (failed.state, failed.error_type) == ("failed", "JobFailure")
    assert "has 2 values; the model takes 4" in failed.error_message
    assert _job(sessions, elsewhere).state == "queued"
    assert _job(sessions, bobs).state == "queued"
    assert _job(sessions, cancelled).state == "cancelled"


def test_a_batched_jobs_own_message_is_dropped_as_stale(runtime, sessions, tmp_path):
    register_model(sessions, runtime.store, tmp_path)
    leader = _submit(sessions, {"model": "m", "inputs": [[0.0] * 4]})
    follower = _submit(sessions, {"model": "m", "inputs": [[1.0] * 4]})
    execute_attempt(runtime, leader, 0, "w1", never_resent)
    before = _job(sessions, follower)

    execute_attempt(runtime, follower, 0, "w2", never_resent)

    after = _job(sessions, follower)
    assert (before.state, after.state) == ("succeeded", "succeeded")
    assert after.attempt == 1
    assert after.result == before.result


def test_a_leader_scores_jobs_still_waiting_in_further_passes(settings, sessions, tmp_path):
    model_cache.shared.cache_clear()
    small = settings.model_copy(update={"predict_batch_max_rows": 4})
    runtime = Runtime(small, sessions, ArtifactStore(settings.artifacts_dir))
    model, _ = register_model(sessions, runtime.store, tmp_path)
    rows = [[float(n), 0.5, -1.0, 2.0] for n in range(10)]
    ids = [_submit(sessions, {"model": "m", "inputs": [row]}) for row in rows]

    execute_attempt(runtime, ids[0], 0, "w1", never_resent)

    done = [_job(sessions, job_id) for job_id in ids]
    assert [job.state for job in done] == ["succeeded"] * 10
    assert (done[0].result["batch_jobs"], done[0].result["batch_passes"]) == (10, 3)  # 4+4+2
    labels = [job.result["predictions"][0]["label"] for job in done]
    assert labels == _labels(model, rows)


def test_batching_can_be_turned_off(settings, sessions, tmp_path):
    model_cache.shared.cache_clear()
    unbatched = settings.model_copy(update={"predict_batch_max_rows": 1})
    runtime = Runtime(unbatched, sessions, ArtifactStore(settings.artifacts_dir))
    register_model(sessions, runtime.store, tmp_path)
    first = _submit(sessions, {"model": "m", "inputs": [[0.0] * 4]})
    second = _submit(sessions, {"model": "m", "inputs": [[1.0] * 4]})

    execute_attempt(runtime, first, 0, "w1", never_resent)

    assert _job(sessions, first).result["batch_jobs"] == 1
    assert _job(sessions, second).state == "queued"
