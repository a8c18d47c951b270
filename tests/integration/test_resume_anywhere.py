"""Resume anywhere: two "hosts" on this machine (worker sets with separate data dirs) share
one PostgreSQL, one Redis and one S3 (moto's server). Host A's workers are SIGKILLed and its
data dir deleted mid-train and mid-batch; the reconciler re-queues both jobs and host B
finishes them from what A committed to the artifact store: training from A's last
published checkpoint, batch scoring from A's last committed chunk, every row exactly once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelkit import add_dataset, register_model, slow_config
from s3kit import BUCKET, moto_s3
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.models import Job, JobEvent, ModelVersion
from kiln import datasets
from kiln.artifacts import open_store
from kiln.broker import make_celery, send_run
from kiln.settings import Settings
from workers.ml import checkpoint as ckpt
from workers.runners import batch_parts
from workers.scheduler import reconcile_once

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

ROOT = Path(__file__).resolve().parents[2]
#: Generous: worker start-up imports torch, and CI machines are small and shared.
DEADLINE_S = 300
ROWS, CHUNK = 160_000, 2_000
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with moto_s3(monkeypatch) as endpoint:
        yield endpoint


@pytest.fixture
def shared(tmp_path: Path, database_url: str, redis_url: str, s3_endpoint: str) -> Settings:
    """What every host is told: the database, the broker and the artifacts URL."""
    return Settings(
        data_dir=tmp_path / "test-data",
        database_url=database_url,
        redis_url=redis_url,
        artifacts_url=f"s3://{BUCKET}/kiln",
        artifacts_endpoint_url=s3_endpoint,
    )


class Host:
    """Celery workers sharing one data dir, as on one machine; `kill` is the machine dying."""

    def __init__(self, name: str, shared: Settings, root: Path) -> None:
        self.name, self.shared, self.root = name, shared, root
        self.data_dir = root / name / "data"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start_worker(self) -> None:
        index = len(self.processes)
        env = {
            **os.environ,  # the AWS_* credentials moto_s3 set
            "PYTHONPATH": str(ROOT),
            "KILN_DATABASE_URL": self.shared.database_url,
            "KILN_REDIS_URL": self.shared.redis_url,
            "KILN_ARTIFACTS_URL": self.shared.artifacts_url,
            "KILN_ARTIFACTS_ENDPOINT_URL": self.shared.artifacts_endpoint_url,
            "KILN_DATA_DIR": str(self.data_dir),
            "CUDA_VISIBLE_DEVICES": "",
            # As the launcher does per lane: three workers on a small machine, one thread each.
            "OMP_NUM_THREADS": "1",
        }
        argv = [
            sys.executable, "-m", "celery", "-A", "workers.main", "worker",
            "--hostname", f"{self.name}{index}@%h", "--queues", "cpu", "--concurrency", "1",
            "--prefetch-multiplier", "1", "--pool", "prefork", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        with (self.root / f"{self.name}{index}.log").open("wb") as log:
            self.processes.append(
                subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def kill(self) -> None:
        """SIGKILL every worker process group, then lose the disk: nothing gets to clean up."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        shutil.rmtree(self.data_dir)


@pytest.fixture
def hosts(shared: Settings, tmp_path: Path) -> Iterator[Callable[[str], Host]]:
    started: list[Host] = []

    def make(name: str) -> Host:
        host = Host(name, shared, tmp_path)
        started.append(host)
        return host

    yield make
    for host in started:
        for process in host.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _wait_for(what: str, check: Callable[[], Any], logs: Path) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while not (value := check()):
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.glob("*.log"))
            pytest.fail(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)
    return value


def _submit(sessions: sessionmaker[Session], shared: Settings, kind: str, spec: dict) -> str:
    with sessions() as session:
        job_id = jobs.create(session, kind=kind, owner="alice", spec=spec, queue="cpu").id
        session.commit()
    send_run(make_celery(shared), job_id, 0, "cpu", 0)
    return job_id


def _job(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _log(sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with sessions() as session:
        query = select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return list(session.scalars(query))


@pytest.mark.timeout(900)  # worker start-ups and two jobs on a small machine: a safety net
def test_jobs_whose_host_is_lost_finish_on_another_host_from_what_it_committed(
    shared: Settings,
    hosts: Callable[[str], Host],
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    store = open_store(shared)
    register_model(sessions, store, tmp_path, cfg=slow_config())
    rng = np.random.default_rng(0)
    table = pa.table({"id": np.arange(ROWS)} | {f"f{i}": rng.normal(size=ROWS) for i in range(4)})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=50_000)
    dataset = add_dataset(sessions, store, tmp_path / "in.parquet", "parquet")

    host_a = hosts("hosta")
    host_a.start_worker()
    host_a.start_worker()  # one job each (prefetch 1, acks late: a busy worker takes no more)
    batch_spec = {"model": "m", "dataset": dataset, "passthrough": ["id"], "chunk_rows": CHUNK}
    batch_id = _submit(sessions, shared, "batch_predict", batch_spec)
    train_spec = {
        "model_name": "digits",
        "dataset": "builtin:digits",
        "arch_params": {"hidden": [64]},
        # Seconds on a fast machine: the first epoch's save is published at once, so the
        # kill lands mid-training.
        "epochs": 100,
        "batch_size": 16,
        "device": "cpu",
        "checkpoint_every_s": 1,  # how often a save leaves the host
    }
    train_id = _submit(sessions, shared, "train", train_spec)
    chunks = store.job_files(batch_id, batch_parts.FOLDER)
    checkpoint = store.job_files(train_id, ckpt.FOLDER)

    def committed_chunks() -> int:
        return sum(name.startswith("commit-") for name in chunks.names())

    _wait_for(
        "a published checkpoint and three committed chunks",
        lambda: checkpoint.get_bytes("committed.json") and committed_chunks() >= 3,
        tmp_path,
    )
    host_a.kill()
    for job_id in (train_id, batch_id):
        killed = _job(sessions, job_id)
        assert (killed.state, killed.attempt) == ("running", 1), "killed mid-way, not after"
        assert killed.worker is not None
        assert killed.worker.startswith("hosta")

    celery = make_celery(shared)
    recovering = shared.model_copy(update={"heartbeat_timeout_s": 1.0})
    requeued: list[int] = []

    def both_requeued() -> bool:
        requeued.append(reconcile_once(celery, sessions, recovering).requeued)
        return sum(requeued) == 2

    _wait_for("the reconciler to re-queue both jobs", both_requeued, tmp_path)
    # Host A is dead: what the store holds now is all it committed.
    committed_by_a = committed_chunks()
    assert 3 <= committed_by_a < ROWS // CHUNK

    host_b = hosts("hostb")
    host_b.start_worker()
    for job_id in (train_id, batch_id):
        _wait_for(
            "host B to finish", lambda j=job_id: _job(sessions, j).state in FINISHED, tmp_path
        )

    trained = _job(sessions, train_id)
    assert (trained.state, trained.attempt) == ("succeeded", 2), trained.error_message
    assert trained.worker is not None
    assert trained.worker.startswith("hostb")
    assert trained.result is not None
    assert trained.result["resumed_from_epoch"] > 0
    train_log = _log(sessions, train_id)
    assert "fetched this job's checkpoint from the artifact store" in train_log
    resumed = next(m for m in train_log if m.startswith("resuming from checkpoint"))
    epoch = int(re.search(r"epoch (\d+)", resumed).group(1))  # type: ignore[union-attr]
    assert epoch == trained.result["resumed_from_epoch"]
    with sessions() as session:
        versions = session.scalar(
            select(func.count())
            .select_from(ModelVersion)
            .where(ModelVersion.source_job_id == train_id)
        )
    assert versions == 1

    scored = _job(sessions, batch_id)
    assert (scored.state, scored.attempt) == ("succeeded", 2), scored.error_message
    assert scored.worker is not None
    assert scored.worker.startswith("hostb")
    batch_log = _log(sessions, batch_id)
    # Host B started at A's last committed chunk: only the uncommitted ones scored again.
    assert f"resuming at row {committed_by_a * CHUNK} ({committed_by_a} chunks were done)" in (
        batch_log
    ), batch_log
    assert f"fetched {committed_by_a} committed chunks from the artifact store" in batch_log
    assert scored.result is not None
    assert scored.result["rows"] == ROWS
    output = store.path(scored.result["output"]["digest"])
    ids = np.concatenate(
        [b.column("id").to_numpy() for b in datasets.iter_batches(output, "parquet", 100_000)]
    )
    np.testing.assert_array_equal(ids, np.arange(ROWS))  # none lost, none repeated, in order

    # Finished: neither job leaves resumable state behind in the store.
    assert checkpoint.names() == []
    assert chunks.names() == []
