"""GET /metrics on the web: requests by route template, and jobs as the database sees them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from db.base import utcnow
from web.metrics import JobSystemCollector


def scrape(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.get_data(as_text=True))
        for sample in family.samples
    }


def test_requests_are_counted_by_route_template_not_path(
    client: FlaskClient, alice: dict[str, str], create_job: Callable
) -> None:
    key = ("kiln_http_requests_total", (("method", "GET"), ("route", "/api/v1/jobs/<job_id>"),
                                        ("status", "200")))  # fmt: skip
    before = scrape(client).get(key, 0.0)
    for _ in range(3):
        job = create_job()
        assert client.get(f"/api/v1/jobs/{job.id}", headers=alice).status_code == 200
    client.get("/no/such/page")
    after = scrape(client)
    assert after[key] - before == 3
    unmatched = ("kiln_http_requests_total",
                 (("method", "GET"), ("route", "<unmatched>"), ("status", "404")))  # fmt: skip
    assert after[unmatched] >= 1
    assert not any(
        job.id in labels_text for (_, labels) in after for labels_text in map(str, labels)
    )


def test_jobs_are_reported_by_kind_and_state_from_the_database(
    client: FlaskClient, create_job: Callable
) -> None:
    create_job(kind="echo", state="succeeded")
    create_job(kind="echo", state="failed")
    create_job(kind="echo", state="failed")
    create_job(kind="train", spec={"model_name": "m"}, state="running")
    create_job(kind="echo", queue="gpu", created_at=utcnow() - timedelta(minutes=10))
    samples = scrape(client)
    assert samples[("kiln_jobs_submitted_total", (("kind", "echo"),))] == 4
    assert samples[("kiln_jobs_submitted_total", (("kind", "train"),))] == 1
    assert samples[("kiln_jobs_finished_total", (("kind", "echo"), ("state", "failed")))] == 2
    assert samples[("kiln_jobs_finished_total", (("kind", "echo"), ("state", "succeeded")))] == 1
    assert samples[("kiln_jobs_active", (("kind", "train"), ("state", "running")))] == 1
    age = samples[("kiln_queue_oldest_job_age_seconds", (("queue", "gpu"),))]
    assert 590 < age < 3600
    assert samples[("kiln_running_job_heartbeat_age_max_seconds", ())] >= 0


def test_readings_are_cached_between_scrapes(app, create_job: Callable) -> None:
    collector = JobSystemCollector(app.extensions["kiln.engine"], None, cache_s=3600)
    first = {m.name: m for m in collector.collect()}
    create_job(kind="echo")
    second = {m.name: m for m in collector.collect()}
    assert first["kiln_jobs_submitted"].samples == second["kiln_jobs_submitted"].samples
    fresh = JobSystemCollector(app.extensions["kiln.engine"], None, cache_s=0)
    (sample,) = {m.name: m for m in fresh.collect()}["kiln_jobs_submitted"].samples
    assert sample.value == 1


def test_metrics_need_no_api_key(client: FlaskClient) -> None:
    assert client.get("/metrics").status_code == 200
