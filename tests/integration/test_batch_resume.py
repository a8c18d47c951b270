"""A batch_predict job survives its worker being SIGKILLed: the reconciler re-queues it, a new
worker resumes at the last committed chunk, and the output has every row exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelkit import add_dataset, register_model, slow_config

from db import jobs
from db.models import Job, JobEvent
from kiln import datasets
from kiln.artifacts import ArtifactStore
from kiln.broker import make_celery, send_run
from kiln.settings import Settings
from workers.scheduler import reconcile_once

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROWS, CHUNK = 90_000, 2_000


def _start_worker(name: str, settings: Settings, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KILN_DATABASE_URL": settings.database_url,
        "KILN_REDIS_URL": settings.redis_url,
        "KILN_DATA_DIR": str(settings.data_dir),
        "KILN_HEARTBEAT_TIMEOUT_S": str(settings.heartbeat_timeout_s),
        "CUDA_VISIBLE_DEVICES": "",
    }
    argv = [sys.executable, "-m", "celery", "-A", "workers.main", "worker",
            "--hostname", f"{name}@%h", "--queues", "cpu", "--concurrency", "1",
            "--prefetch-multiplier", "1", "--pool", "prefork", "--without-mingle",
            "--without-gossip", "--loglevel", "INFO"]  # fmt: skip
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the worker and its pool children: nothing gets to clean up."""
    parent = psutil.Process(process.pid)
    for proc in [*parent.children(recursive=True), parent]:
        proc.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_sigkilled_batch_job_resumes_on_a_new_worker_without_lost_or_repeated_rows(
    tmp_path, database_url, sessions, redis_url
):
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        redis_url=redis_url,
        heartbeat_timeout_s=1.0,
    )
    store = ArtifactStore(settings.artifacts_dir)
    register_model(sessions, store, tmp_path, cfg=slow_config())
    rng = np.random.default_rng(0)
    table = pa.table({"id": np.arange(ROWS)} | {f"f{i}": rng.normal(size=ROWS) for i in range(4)})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=50_000)
    dataset = add_dataset(sessions, store, tmp_path / "in.parquet", "parquet")
    spec = {"model": "m", "dataset": dataset, "passthrough": ["id"], "chunk_rows": CHUNK}
    with sessions() as session:
        job = jobs.create(session, kind="batch_predict", owner="alice", spec=spec, queue="cpu")
        session.commit()
        job_id = job.id
    celery = make_celery(settings)
    files = store.job_files(job_id, "batch")

    def committed() -> int:  # a chunk's commit marker in the store, written last, commits it
        return sum(name.startswith("commit-") for name in files.names())

    first = _start_worker("first", settings, tmp_path / "first.log")
    try:
        send_run(celery, job_id, 0, "cpu", 0)
        _wait_for(lambda: committed() >= 3, 120, "three committed chunks")
    finally:
        _kill_tree(first)
    killed_at = committed()
    assert 3 <= killed_at < ROWS // CHUNK, "the job must be killed mid-way"

    def requeued() -> bool:
        report = reconcile_once(celery, sessions, settings)
        return report.requeued == 1

    _wait_for(requeued, 60, "the reconciler to re-queue the job")
    second = _start_worker("second", settings, tmp_path / "second.log")
    try:

        def finished() -> Job | None:
            with sessions() as session:
                found = session.get(Job, job_id)
                return found if found.state in ("succeeded", "failed", "cancelled") else None

        done = _wait_for(finished, 240, "the job to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)

    assert done.state == "succeeded", done.error_message
    assert done.attempt == 2
    with sessions() as session:
        events = [e.message for e in session.query(JobEvent).filter_by(job_id=job_id)]
    assert any(m.startswith("resuming at row") for m in events), events
    resumed_row = int(next(m for m in events if m.startswith("resuming")).split()[3])
    assert resumed_row >= killed_at * CHUNK
    path = store.path(done.result["output"]["digest"])
    ids = np.concatenate(
        [b.column("id").to_numpy() for b in datasets.iter_batches(path, "parquet", 100_000)]
    )
    np.testing.assert_array_equal(ids, np.arange(ROWS))  # none lost, none repeated, in order
