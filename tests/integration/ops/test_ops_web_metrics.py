"""`kiln web` (gunicorn, two worker processes) answers /metrics with the counts of both."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from ops_support import Worker, free_port, wait_until, worker_env
from prometheus_client.parser import text_string_to_metric_families

from kiln.settings import Settings

pytestmark = pytest.mark.integration


def healthz_count(body: str) -> float:
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "kiln_http_requests_total" and sample.labels == {
                "method": "GET", "route": "/healthz", "status": "200",
            }:  # fmt: skip
                return sample.value
    return 0.0


def test_every_gunicorn_worker_reports_the_sum_of_all(
    pg_url: str, broker_url: str, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    port = free_port()
    settings = Settings(data_dir=tmp_path, database_url=pg_url, redis_url=broker_url)
    env = worker_env(settings, KILN_PORT=str(port))
    web = start_worker([sys.executable, "-m", "kiln.cli", "web"], env)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(f"{url}/healthz", timeout=30).status_code == 200
        except (requests.ConnectionError, requests.Timeout):  # still booting
            return False

    def healthz_seen() -> float:
        return healthz_count(requests.get(f"{url}/metrics", timeout=30).text)

    wait_until(healthy, 90, f"`kiln web` to answer on port {port}")
    before = healthz_seen()
    for _ in range(30):
        assert healthy()
    # Each scrape may be answered by either gunicorn worker: all must see every request.
    assert {healthz_seen() for _ in range(8)} == {before + 30}, web.output()[-2000:]
    body = requests.get(f"{url}/metrics", timeout=30).text
    assert 'kiln_queue_depth{queue="cpu"} 0.0' in body
    assert "kiln_broker_up 1.0" in body
    pids = {p.stem.rsplit("_", 1)[-1] for p in (tmp_path / "prometheus" / "web").glob("*.db")}
    assert len(pids) >= 1
    web.stop()
    assert web.process.returncode is not None
