"""Shared set-up of the inference benchmarks: a private Kiln (SQLite file, a Redis database),
a registered model, parquet datasets, real worker processes, and waiting for jobs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import redis
import torch
from sqlalchemy import func, select

from db import jobs, migrate, registry
from db.base import utcnow
from db.engine import make_engine, make_sessionmaker
from db.models import Dataset, Job
from kiln import datasets
from kiln.artifacts import ArtifactStore
from kiln.broker import make_celery, send_run
from kiln.settings import Settings
from workers.ml import bundle

ROOT = Path(__file__).resolve().parents[1]
WIDTH, LABELS = 32, [str(i) for i in range(10)]
CONFIG = {
    "arch": "mlp",
    "arch_params": {"hidden": [256, 256], "dropout": 0.0},
    "feature_names": [f"f{i}" for i in range(WIDTH)],
    "label_names": LABELS,
}
TERMINAL = ("succeeded", "failed", "cancelled")


class Kiln:
    """A throw-away Kiln installation for one benchmark run."""

    def __init__(self, redis_db: int) -> None:
        base = os.environ.get("KILN_REDIS_URL")
        if not base:
            sys.exit("set KILN_REDIS_URL to a Redis server the benchmark may flush a database of")
        self.folder = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
        url = f"{base.rstrip('/')}/{redis_db}"
        redis.Redis.from_url(url).flushdb()
        self.settings = Settings(
            data_dir=self.folder / "data",
            database_url=f"sqlite:///{self.folder / 'kiln.db'}",
            redis_url=url,
        )
        migrate.upgrade(self.settings.database_url)
        self.sessions = make_sessionmaker(make_engine(self.settings.database_url))
        self.store = ArtifactStore(self.settings.artifacts_dir)
        self.celery = make_celery(self.settings)

    def close(self) -> None:
        """Remove the installation's files (datasets, outputs, database)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def register_model(self, name: str = "bench", seed: int = 0) -> torch.nn.Module:
        """A new version of model `name`; versions of different seeds have different weights
        (and digests), so a worker loads each anew rather than from its model cache."""
        torch.manual_seed(seed)
        model = bundle.build(CONFIG).eval()
        path = self.folder / "weights.safetensors"
        bundle.save(model, CONFIG, path)
        stored = self.store.put_file(path)
        with self.sessions() as session:
            registry.register_version(
                session, owner="bench", name=name, source_job_id=None, arch="mlp",
                config=CONFIG, metrics={}, artifact_digest=stored.digest,
                artifact_size=stored.size, dataset_digest=None,
            )  # fmt: skip
            session.commit()
        return model

    def register_hf(self, name: str, directory: Path, task: str) -> int:
        """A Hugging Face directory registered as `kiln models push` registers it: its files
        through POST /api/v1/models/<name>/versions (family=hf); the version's number."""
        import io

        from db import keys
        from kiln import hfdir
        from web import create_app

        with self.sessions() as session:
            _, key = keys.create(session, owner="bench", role="user")
            session.commit()
        paths, _ = hfdir.files_to_push(directory)
        files = [(io.BytesIO(path.read_bytes()), path.name) for path in paths]
        app = create_app(self.settings)
        try:
            response = app.test_client().post(
                f"/api/v1/models/{name}/versions",
                data={"family": "hf", "task": task, "files": files},
                headers={"Authorization": f"Bearer {key}"},
            )
        finally:
            app.extensions["kiln.engine"].dispose()
            app.extensions["kiln.celery"].close()
        if response.status_code != 201:
            raise RuntimeError(f"registering {name} failed: {response.get_data(as_text=True)}")
        return int(response.get_json()["number"])

    def text_dataset(self, path: Path) -> str:
        """Record an existing Parquet file as a dataset of the bench user; its id."""
        info = datasets.inspect(path, "parquet")
        stored = self.store.put_file(path)
        with self.sessions() as session:
            row = Dataset(
                owner="bench", name=path.name, format="parquet", rows=info.rows,
                columns=info.columns, size_bytes=stored.size, digest=stored.digest,
                created_at=utcnow(),
            )  # fmt: skip
            session.add(row)
            session.commit()
            return row.id

    def dataset(self, rows: int) -> tuple[str, Path]:
        """A parquet file of `rows` rows (id and WIDTH features), registered as a dataset."""
        path = self.folder / f"rows-{rows}.parquet"
        rng = np.random.default_rng(rows)
        with pq.ParquetWriter(path, _schema()) as writer:
            for start in range(0, rows, 100_000):
                n = min(100_000, rows - start)
                features = rng.normal(size=(n, WIDTH)).astype(np.float32)
                columns = {"id": pa.array(np.arange(start, start + n))}
                columns |= {f"f{i}": pa.array(features[:, i]) for i in range(WIDTH)}
                writer.write_table(pa.table(columns, schema=_schema()))
        info = datasets.inspect(path, "parquet")
        stored = self.store.put_file(path)
        with self.sessions() as session:
            row = Dataset(
                owner="bench", name=path.name, format="parquet", rows=info.rows,
                columns=info.columns, size_bytes=stored.size, digest=stored.digest,
                created_at=utcnow(),
            )  # fmt: skip
            session.add(row)
            session.commit()
            return row.id, path

    def insert(self, kind: str, specs: list[dict[str, Any]]) -> list[str]:
        """Insert queued jobs in one transaction; send them with send()."""
        with self.sessions() as session:
            created = [
                jobs.create(session, kind=kind, owner="bench", spec=spec, queue="cpu")
                for spec in specs
            ]
            session.commit()
            return [job.id for job in created]

    def send(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            send_run(self.celery, job_id, 0, "cpu", 0)

    def run(self, job_ids: list[str], timeout_s: float = 3600) -> float:
        """Send the jobs and wait for them; seconds from the send to the last job's
        finished_at as the database recorded it, so that how often wait() polls neither
        rounds the figure nor (polling more often) takes CPU from the worker."""
        started = utcnow()
        self.send(job_ids)
        return (self.wait(job_ids, timeout_s) - started).total_seconds()

    def wait(self, job_ids: list[str], timeout_s: float = 3600) -> datetime:
        """Until every job is finished; when the last finished. Raises if any did not
        succeed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.sessions() as session:
                left = session.scalar(
                    select(func.count()).where(Job.id.in_(job_ids), Job.state.not_in(TERMINAL))
                )
            if left == 0:
                break
            time.sleep(0.1)
        else:
            raise TimeoutError("jobs did not finish in time")
        with self.sessions() as session:
            bad = session.scalars(
                select(Job).where(Job.id.in_(job_ids), Job.state != "succeeded")
            ).all()
            last = session.scalar(select(func.max(Job.finished_at)).where(Job.id.in_(job_ids)))
        if bad:
            raise RuntimeError(f"{len(bad)} jobs did not succeed, e.g. {bad[0].error_message}")
        assert last is not None
        return last

    def result(self, job_id: str) -> dict[str, Any]:
        with self.sessions() as session:
            return session.get(Job, job_id).result  # type: ignore[union-attr, return-value]

    def _wait_ready(self, name: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
        """Until the worker answers: with others up, the warm-up job may go to one of them,
        and a worker still starting (seconds on a loaded machine) would miss the run."""
        deadline = time.monotonic() + timeout_s
        while not _answers(self.celery, name):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start ({self.folder / name}.log)")

    @contextmanager
    def worker(self, name: str = "bench", **env: str) -> Iterator[subprocess.Popen]:
        """One real Celery worker (as the launcher starts it), warmed up by an echo job;
        workers up at once need names of their own (Celery tells them apart by name)."""
        environ = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "KILN_DATABASE_URL": self.settings.database_url,
            "KILN_REDIS_URL": self.settings.redis_url,
            "KILN_DATA_DIR": str(self.settings.data_dir),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            **env,
        }
        argv = [sys.executable, "-m", "celery", "-A", "workers.main", "worker",
                "--hostname", f"{name}@%h", "--queues", "cpu", "--concurrency", "1",
                "--prefetch-multiplier", "1", "--pool", "prefork", "--without-mingle",
                "--without-gossip", "--loglevel", "WARNING"]  # fmt: skip
        log = (self.folder / f"{name}.log").open("ab")
        process = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=log, stderr=log)
        try:
            self._wait_ready(name, process)
            warm = self.insert("echo", [{"message": "warm"}])
            self.send(warm)
            self.wait(warm, timeout_s=120)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            log.close()


def _answers(celery: Any, name: str) -> bool:
    """Whether the worker named `name` answers a remote-control ping."""
    replies = celery.control.ping(timeout=1.0) or []
    return any(node.startswith(f"{name}@") for reply in replies for node in reply)


def _schema() -> pa.Schema:
    return pa.schema([("id", pa.int64())] + [(f"f{i}", pa.float32()) for i in range(WIDTH)])


#: What the raw loops of the benchmarks write: the columns of a `batch_predict` output.
RAW_OUTPUT_SCHEMA = pa.schema(
    [("id", pa.int64()), ("prediction", pa.string()), ("score", pa.float32())]
)


def raw_score(
    model: torch.nn.Module,
    chunks: Iterator[pa.RecordBatch],
    target: Path,
    batch_size: int,
) -> None:
    """The baseline a `batch_predict` job is held against: a hand-written PyTorch loop
    scoring each chunk of the feature table in batches and writing id, label and score to
    a Parquet file."""
    labels = pa.array(LABELS)
    with pq.ParquetWriter(target, RAW_OUTPUT_SCHEMA) as sink:
        for chunk in chunks:
            features = np.column_stack([chunk[f"f{i}"].to_numpy() for i in range(WIDTH)])
            tensor = torch.from_numpy(features)
            with torch.inference_mode():
                scores = [
                    torch.softmax(model(tensor[start : start + batch_size]), dim=1).max(dim=1)
                    for start in range(0, len(tensor), batch_size)
                ]
            top = torch.cat([s.values for s in scores]).numpy()
            best = torch.cat([s.indices for s in scores]).numpy()
            columns = [chunk["id"], labels.take(best), pa.array(top)]
            sink.write_batch(pa.record_batch(columns, schema=RAW_OUTPUT_SCHEMA))


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by a process and its children."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


class PeakRSS:
    """Sample the resident memory of a process tree in a thread; .peak in bytes."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.root, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
