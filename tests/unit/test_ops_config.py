"""The operator files: Procfile, docker/compose.yaml, docker/prometheus.yml and alerts.yml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from kiln.cli import main
from workers import metrics as worker_metrics

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
GPU_METRICS = {
    "kiln_gpu_utilization_ratio", "kiln_gpu_memory_used_bytes", "kiln_gpu_memory_total_bytes",
}  # fmt: skip


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def test_procfile_runs_web_worker_scheduler_and_deliver_through_kiln_commands() -> None:
    entries = procfile()
    assert set(entries) == {"web", "worker", "scheduler", "deliver"}
    for name, command in entries.items():
        program, subcommand = command.split()
        assert program == "kiln"
        assert subcommand == name
        assert subcommand in main.commands


def test_honcho_accepts_the_procfile() -> None:
    pytest.importorskip("honcho", reason="honcho is in the ops and dev extras")
    checked = subprocess.run(
        [sys.executable, "-m", "honcho", "check"], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert "web, worker, scheduler, deliver" in checked.stderr + checked.stdout


def exported_names(client: FlaskClient) -> set[str]:
    """Every metric family name Kiln's web and workers export."""
    scraped = client.get("/metrics").get_data(as_text=True)
    names = {family.name for family in text_string_to_metric_families(scraped)}
    for value in vars(worker_metrics).values():
        if hasattr(value, "describe") and hasattr(value, "_name"):
            names.update(family.name for family in value.describe())
    return names | GPU_METRICS


def sample_name_family(name: str) -> str:
    return re.sub(r"_(total|count|sum|bucket)$", "", name)


def test_alert_rules_are_complete_and_name_only_metrics_kiln_exports(make_app) -> None:
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    # A real Celery app (on the in-memory broker), so the queue depth metrics are there too.
    exported = exported_names(make_app(sender=None).test_client())
    assert "kiln_queue_depth" in exported
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in alerts} >= {
        "KilnJobFailureRateHigh", "KilnQueueWaitingTooLong", "KilnWorkersStalled",
    }  # fmt: skip
    for rule in alerts:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        used = set(re.findall(r"\bkiln_[a-z_]+", rule["expr"]))
        unknown = {name for name in used if sample_name_family(name) not in exported}
        assert not unknown, f"{rule['alert']} uses metrics nobody exports: {unknown}"


def test_scrape_config_loads_the_rules_and_scrapes_web_and_workers() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"kiln-web", "kiln-workers"}
    assert jobs["kiln-workers"]["static_configs"][0]["targets"] == ["worker:9810"]


def _compose_command() -> list[str] | None:
    """Compose v2 (`docker compose`) where installed, else Debian's docker-compose (v1)."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    if command[-1].endswith("docker-compose"):
        # v1's schema predates the top-level project `name`; everything else it checks.
        assert compose.pop("name") == "kiln"
    checked_file = tmp_path / "compose.yaml"
    checked_file.write_text(yaml.safe_dump(compose))
    checked = subprocess.run(
        [*command, "--project-directory", str(DOCKER), "-f", str(checked_file), "config", "-q"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "KILN_ADMIN_KEY": "x"},
    )
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(("what", "path"), [("rules", "alerts.yml"), ("config", "prometheus.yml")])
def test_promtool_accepts_the_files(what: str, path: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    checked = subprocess.run(
        [promtool, "check", what, path], cwd=DOCKER, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


ALERT_CASES = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # train: 2 succeeded then 6 failed within 30 minutes; echo: all fine.
      - series: 'kiln_jobs_finished_total{{kind="train",state="succeeded"}}'
        values: '0 1 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2'
      - series: 'kiln_jobs_finished_total{{kind="train",state="failed"}}'
        values: '0 0 0 1 2 3 4 5 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6 6'
      - series: 'kiln_jobs_finished_total{{kind="echo",state="succeeded"}}'
        values: '0+5x30'
      - series: 'kiln_running_job_heartbeat_age_max_seconds{{instance="web:8000"}}'
        values: '0 60 120 180 240 300 360 420 480 540 600 660 720 780 840 900'
      - series: 'kiln_queue_oldest_job_age_seconds{{queue="gpu",instance="web:8000"}}'
        values: '0+60x40'
    alert_rule_test:
      - eval_time: 25m
        alertname: KilnJobFailureRateHigh
        exp_alerts:
          - exp_labels: {{severity: warning, kind: train}}
            exp_annotations:
              summary: "More than 25% of train jobs failed in the last 30 minutes"
              description: "Read the failed jobs' error fields (GET /api/v1/jobs?state=failed)."
      - eval_time: 12m
        alertname: KilnWorkersStalled
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: "A running job has not sent a heartbeat for over 4 minutes"
      - eval_time: 3m
        alertname: KilnWorkersStalled
        exp_alerts: []
      - eval_time: 38m
        alertname: KilnQueueWaitingTooLong
        exp_alerts:
          - exp_labels: {{severity: warning, queue: gpu}}
            exp_annotations:
              summary: "Jobs in queue gpu have waited over 30 minutes"
"""


def test_alerts_fire_on_the_situations_they_name(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    cases = tmp_path / "alerts_test.yml"
    cases.write_text(ALERT_CASES.format(rules=json.dumps(str(DOCKER / "alerts.yml"))))
    checked = subprocess.run(
        [promtool, "test", "rules", str(cases)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
