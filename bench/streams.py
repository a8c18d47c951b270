"""Live streams under load: many open GET /api/v1/jobs/<id>/stream on one `kiln web` while
jobs run, and the API's ordinary requests beside them.

Starts a private Redis (kiln.embedded, unless --redis-url), migrates a temporary SQLite
database (unless --database-url), starts `kiln web` exactly as deployed (gunicorn, 2
processes, gthread) and --workers Celery workers on the interactive CPU queue, then:

1. baseline: --api-clients concurrent clients call GET /api/v1/jobs/<id> for --window-s
   seconds with no stream open: requests/s and p50/p99 latency;
2. submits --jobs `echo` jobs sleeping --job-s (each reports its progress every 0.5 s, as
   every runner does) and opens --streams streams spread over them;
3. once every stream has its first event, while the jobs run, the same API load again
   for --window-s;
4. reads every stream to its end. For each progress and state event the latency is the
   client's receipt time minus the event's `at` (the time the worker's report was
   committed: both clocks are this host's), reported as p50/p99.

The clients are raw asyncio sockets speaking HTTP/1.0 (no client library between the
socket and the SSE parser), in this one process.

Run: python bench/streams.py [--streams 500] [--jobs 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from queue_overhead import (  # noqa: E402  (bench/ is not a package)
    celery_worker_argv,
    free_port,
    percentile,
    prepare_database,
    process_group,
    wait_http_ready,
)

from kiln import sse  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=8, help="echo jobs the streams follow")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--job-s", type=float, default=30.0, help="each echo job's sleep")
    parser.add_argument("--api-clients", type=int, default=8)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--database-url", default=os.environ.get("KILN_DATABASE_URL", ""))
    parser.add_argument("--redis-url", default="", help="default: a private embedded Redis")
    return parser.parse_args(argv)


# --- raw HTTP/1.0 over asyncio -------------------------------------------------------------


async def http_get(port: int, path: str, key: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request(path, key))
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _request(path: str, key: str, extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n{extra}\r\n"
    ).encode()


@dataclass
class StreamResult:
    status: int = 0
    events: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    final: str = ""


async def read_stream(port: int, job_id: str, key: str, result: StreamResult) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            _request(f"/api/v1/jobs/{job_id}/stream", key, "Accept: text/event-stream\r\n")
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        result.status = int(head.split(b" ", 2)[1])
        if result.status != 200:
            return
        parser = sse.Parser()
        while chunk := await reader.read(65536):
            received = time.time()
            for event in parser.feed(chunk):
                result.events += 1
                data = event.json()
                if data["type"] in {"progress", "state"} and data.get("at"):
                    at = datetime.fromisoformat(data["at"]).timestamp()
                    result.latencies_ms.append((received - at) * 1000)
                if data["type"] == "state":
                    result.final = data["state"]
    finally:
        writer.close()


@dataclass
class Load:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    @property
    def per_s(self) -> float:
        return len(self.latencies_ms) / self.seconds


async def api_load(port: int, key: str, job_id: str, clients: int, window_s: float) -> Load:
    load = Load()
    stop = time.monotonic() + window_s

    async def client() -> None:
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                status, _ = await http_get(port, f"/api/v1/jobs/{job_id}", key)
            except OSError:
                status = 0
            if status == 200:
                load.latencies_ms.append((time.perf_counter() - started) * 1000)
            else:
                load.errors += 1

    began = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    load.seconds = time.monotonic() - began
    return load


async def submit(port: int, key: str, job_s: float) -> str:
    import json

    body = json.dumps({"kind": "echo", "spec": {"sleep_s": job_s}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"POST /api/v1/jobs HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    if b" 202 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise RuntimeError(f"submit answered {head!r} {payload!r}")
    return str(json.loads(payload)["id"])


# --- the run ---------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, port: int, key: str) -> dict[str, Any]:
    probe = await submit(port, key, 0)  # a job for the API load to read
    baseline = await api_load(port, key, probe, args.api_clients, args.window_s)
    job_ids = [await submit(port, key, args.job_s) for _ in range(args.jobs)]
    results = [StreamResult() for _ in range(args.streams)]
    streams = [
        asyncio.create_task(read_stream(port, job_ids[i % len(job_ids)], key, result))
        for i, result in enumerate(results)
    ]
    # Measure once every stream is open and has caught up (its first event came).
    while not all(r.events or (r.status and r.status != 200) for r in results):
        await asyncio.sleep(0.2)
    loaded = await api_load(port, key, probe, args.api_clients, args.window_s)
    await asyncio.gather(*streams)
    return {"baseline": baseline, "loaded": loaded, "streams": results}


def report(args: argparse.Namespace, found: dict[str, Any], elapsed: float) -> None:
    results: list[StreamResult] = found["streams"]
    opened = [r for r in results if r.status == 200]
    latencies = [ms for r in opened for ms in r.latencies_ms]
    refused = statistics.mode([r.status for r in results if r.status != 200] or [0])
    print(f"bench/streams.py on {platform.node()} ({os.cpu_count()} cores), {elapsed:.0f} s")
    print(
        f"streams: {len(opened)}/{args.streams} opened (others answered {refused}), "
        f"{sum(r.events for r in opened)} events, "
        f"{sum(r.final == 'succeeded' for r in opened)} ended with 'succeeded'"
    )
    if len(latencies) >= 2:
        print(
            f"report -> client latency over {len(latencies)} progress/state events: "
            f"p50 {percentile(latencies, 50):.0f} ms, p99 {percentile(latencies, 99):.0f} ms, "
            f"max {max(latencies):.0f} ms (goal: p99 <= 500 ms)"
        )
    for name in ("baseline", "loaded"):
        load: Load = found[name]
        what = "no stream open" if name == "baseline" else f"{len(opened)} streams open"
        if len(load.latencies_ms) >= 2:
            print(
                f"API GET /jobs/<id>, {args.api_clients} clients, {what}: "
                f"{load.per_s:.0f} req/s, p50 {percentile(load.latencies_ms, 50):.0f} ms, "
                f"p99 {percentile(load.latencies_ms, 99):.0f} ms, {load.errors} errors"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kiln import embedded
    from kiln.settings import Settings

    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="kiln-bench-streams-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        data_dir = work / "data"
        data_dir.mkdir()
        redis_url = args.redis_url
        if not redis_url:
            redis = embedded.start_redis(data_dir / "redis")
            stack.callback(redis.stop)
            redis_url = redis.url
        settings = Settings(data_dir=data_dir, database_url=args.database_url)
        key = prepare_database(settings.resolved_database_url)
        port = free_port()
        env = {
            **os.environ,
            "KILN_RATE_LIMIT": "",
            "KILN_DATABASE_URL": settings.resolved_database_url,
            "KILN_REDIS_URL": redis_url,
            "KILN_DATA_DIR": str(data_dir),
            "KILN_HOST": "127.0.0.1",
            "KILN_PORT": str(port),
            "KILN_STREAMS_PER_KEY": str(args.streams + 10),
            "KILN_LOG_FORMAT": "json",
            "CUDA_VISIBLE_DEVICES": "",
        }
        web = stack.enter_context(
            process_group("kiln-web", [sys.executable, "-m", "kiln.cli", "web"], env, work)
        )
        for n in range(args.workers):
            argv = celery_worker_argv("workers.main", "interactive.cpu", f"bench-{n}")
            stack.enter_context(process_group(f"worker-{n}", argv, env, work))
        wait_http_ready(f"http://127.0.0.1:{port}", web)
        found = asyncio.run(measure(args, port, key))
        report(args, found, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
