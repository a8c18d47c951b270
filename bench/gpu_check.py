"""The steps of bench/gpu_check.sh that need Python: each prints one `RESULT|step|status|detail`
line for the script's summary table (status: ok, FAIL or skip).

    python bench/gpu_check.py kiln    # kiln run on this host: an AMP train, a GPU
                                      # batch_predict against a raw GPU loop, the GPU scrape
    python bench/gpu_check.py ddp     # torch.distributed NCCL, one rank: all_reduce + DDP step
    python bench/gpu_check.py kiln --device cpu --rows 20000   # a rehearsal on a CPU host

`kiln` starts `kiln run` (embedded Redis, SQLite, web, scheduler, a worker per GPU) in a
throw-away data dir and drives it with kiln.Client, as a user would. Kiln runs DDP only for
`gpus: N > 1` training, so on a one-GPU machine `ddp` is a raw torch.distributed check of
the NCCL install, not Kiln's distributed path.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def result(step: str, ok: bool | None, detail: str) -> None:
    status = "skip" if ok is None else "ok" if ok else "FAIL"
    print(f"RESULT|{step}|{status}|{detail}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Utilisation:
    """GPU 0's utilisation through NVML, sampled every 0.1 s while the block runs."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            while not self._stop.wait(0.1):
                self.samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            pynvml.nvmlShutdown()
        except Exception:  # no nvidia-ml-py: the figure is reported as unknown
            return

    def __enter__(self) -> Utilisation:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def text(self) -> str:
        if not self.samples:
            return "util n/a"
        return f"util mean {sum(self.samples) / len(self.samples):.0f}% max {max(self.samples)}%"


def _timed(step: str, work: Callable[[], str]) -> None:
    try:
        result(step, True, work())
    except Exception as exc:
        result(step, False, f"{type(exc).__name__}: {exc}"[:200])


def kiln_steps(rows: int, device: str) -> None:
    """Start `kiln run`, then the AMP train, the batch comparison and the GPU scrape; with
    `device` cpu, the same on the CPU (a rehearsal of this script where no GPU is)."""
    import requests

    from kiln.client import Client

    folder = Path(tempfile.mkdtemp(prefix="kiln-gpu-check-"))
    port, metrics_port = _free_port(), _free_port()
    key = "kiln_gpu_check_" + os.urandom(8).hex()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KILN_DATA_DIR": str(folder / "data"),
        "KILN_PORT": str(port),
        "KILN_METRICS_PORT": str(metrics_port),
        "KILN_ADMIN_KEY": key,
        "KILN_GPUS": os.environ.get("KILN_GPUS", "auto") if device == "gpu" else "none",
        "KILN_REDIS_URL": "",  # kiln run's embedded Redis
    }
    env.pop("KILN_DATABASE_URL", None)
    log = (folder / "kiln-run.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "run"], cwd=ROOT, env=env, stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}", key)
    try:
        _wait_ready(client, server, folder, device)
        _timed("amp_train", lambda: _amp_train(client, device))
        _timed("batch_vs_raw", lambda: _batch_vs_raw(client, folder, rows, device))
        if device == "gpu":
            _timed("gpu_scrape", lambda: _scrape(requests, metrics_port))
        else:
            result("gpu_scrape", None, "no GPU: a CPU rehearsal")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        print(f"(kiln run's log: {folder / 'kiln-run.log'})", file=sys.stderr)


def _wait_ready(client: Any, server: subprocess.Popen[bytes], folder: Path, device: str) -> None:
    from kiln.client import ClientError

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kiln run exited; see {folder / 'kiln-run.log'}")
        try:
            if any(w["devices"][0].startswith(device) for w in client.workers()):
                return
        except ClientError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no {device} worker after 90 s; see {folder / 'kiln-run.log'}")


def _amp_train(client: Any, device: str) -> str:
    """A train job on the GPU with mixed precision (precision auto: bf16 where supported)."""
    spec = {
        "model_name": "gpu-amp",
        "dataset": "builtin:digits",
        "device": device,
        "precision": "auto",
        "epochs": 5,
    }
    job = client.submit("train", spec).wait(progress=False, timeout_s=150)
    accuracy = job["result"]["metrics"].get("val_accuracy")
    return f"{job['device']} {job['result']['epochs_run']} epochs, val_accuracy {accuracy}"


def _batch_vs_raw(client: Any, folder: Path, rows: int, device: str) -> str:
    """A GPU batch_predict job against a raw loop doing the same work on the same GPU."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    version = client.model_version("gpu-amp", "latest")
    config = version["config"]
    names = config["feature_names"]
    rng = np.random.default_rng(0)
    table = pa.table(
        {"id": np.arange(rows)} | {n: rng.normal(size=rows).astype(np.float32) for n in names}
    )
    path = folder / "rows.parquet"
    pq.write_table(table, path)
    dataset = client.upload_dataset(path)
    spec = {
        "model": "gpu-amp",
        "dataset": dataset["id"],
        "device": device,
        "passthrough": ["id"],
        "batch_size": 4096,
    }
    with Utilisation() as kiln_util:
        job = client.submit("batch_predict", spec).wait(progress=False, timeout_s=150)
    kiln_s = _seconds(job["started_at"], job["finished_at"])

    from kiln.artifacts import ArtifactStore
    from workers.ml import bundle

    store = ArtifactStore(folder / "data" / "artifacts")
    on = torch.device("cuda" if device == "gpu" else "cpu")
    model = bundle.load(store.path(version["artifact_digest"]), config, on)
    with Utilisation() as raw_util:
        started = time.perf_counter()
        source = pq.ParquetFile(path)
        schema = pa.schema(
            [("id", pa.int64()), ("prediction", pa.int64()), ("score", pa.float32())]
        )
        with pq.ParquetWriter(folder / "raw.parquet", schema) as sink, torch.inference_mode():
            for chunk in source.iter_batches(batch_size=16_384):
                features = np.column_stack([chunk[n].to_numpy() for n in names])
                tensor = torch.from_numpy(features).to(on, non_blocking=True)
                scores = [
                    torch.softmax(model(tensor[s : s + 4096]), dim=1).max(dim=1)
                    for s in range(0, len(tensor), 4096)
                ]
                top = torch.cat([score.values for score in scores])
                best = torch.cat([score.indices for score in scores])
                sink.write_batch(
                    pa.record_batch(
                        [chunk["id"], pa.array(best.cpu().numpy()), pa.array(top.cpu().numpy())],
                        schema=schema,
                    )
                )
        if on.type == "cuda":
            torch.cuda.synchronize()
        raw_s = time.perf_counter() - started
    return (
        f"{rows} rows: job {kiln_s:.2f}s (claim to done) vs raw {raw_s:.2f}s, "
        f"ratio raw/job {raw_s / kiln_s:.2f}; job {kiln_util.text()}; raw {raw_util.text()}"
    )


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _scrape(requests: Any, port: int) -> str:
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    lines = [line for line in body.splitlines() if line.startswith("kiln_gpu_")]
    if not any(line.startswith("kiln_gpu_utilization_ratio") for line in lines):
        raise RuntimeError("no kiln_gpu_utilization_ratio series (is nvidia-ml-py installed?)")
    return "; ".join(lines[:3])


def ddp_step() -> None:
    """NCCL, one rank: an all_reduce and one DistributedDataParallel step on cuda:0."""
    import torch
    import torch.distributed as dist

    rendezvous = Path(tempfile.mkdtemp()) / "rendezvous"
    try:
        dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=0, world_size=1)
        value = torch.ones(4, device="cuda")
        dist.all_reduce(value)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Linear(8, 2).cuda(), device_ids=[0]
        )
        loss = model(torch.randn(16, 8, device="cuda")).square().mean()
        loss.backward()
        torch.cuda.synchronize()
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        result("ddp_nccl_1rank", True, f"all_reduce {value.tolist()}, DDP step ok, NCCL {nccl}")
    except Exception as exc:
        result("ddp_nccl_1rank", False, f"{type(exc).__name__}: {exc}"[:200])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["kiln", "ddp"])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for batch_vs_raw")
    parser.add_argument(
        "--device", choices=["gpu", "cpu"], default="gpu", help="cpu: rehearse on a CPU host"
    )
    args = parser.parse_args()
    if args.step == "kiln":
        kiln_steps(args.rows, args.device)
    else:
        ddp_step()


if __name__ == "__main__":
    main()
