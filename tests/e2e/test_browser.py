"""The UI in a real browser against a real server and worker: sign in, upload, train, watch
the chart grow, promote, batch-score and download, cancel, schedule. Set
KILN_SCREENSHOTS=docs/screenshots to refresh the README's screenshots from this run."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

#: True once the log box overflows and is scrolled to its newest line.
_LOG_AT_TAIL = """() => {
  const box = document.getElementById('log-lines');
  return box && box.scrollHeight > box.clientHeight
    && box.scrollHeight - box.scrollTop - box.clientHeight <= 24;
}"""

#: Resolves to the job's state and the chart's point count (both from the same metrics
#: response) once there are two points or the job has ended; the test asserts it still ran.
_CHART_GREW = """() => {
  const charts = document.getElementById('charts');
  const state = charts.dataset.state || '';
  const points = Number(charts.dataset.points || 0);
  if (points >= 2 || ['succeeded', 'failed', 'cancelled'].includes(state)) {
    return {state, points};
  }
  return null;
}"""


def _blobs_csv(path: Path, rows: int = 2000, features: int = 16, classes: int = 4) -> Path:
    """Separable Gaussian blobs: enough rows that an epoch takes a visible moment."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.35, size=(classes, features))  # overlapping: curves worth a look
    labels = rng.integers(0, classes, size=rows)
    points = centres[labels] + rng.normal(0, 1, size=(rows, features))
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([*(f"x{i}" for i in range(features)), "label"])
        for point, label in zip(points, labels, strict=True):
            writer.writerow([*(f"{v:.4f}" for v in point), int(label)])
    return path


def _shoot(page: Any, name: str) -> None:
    folder = os.environ.get("KILN_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def _badge(page: Any) -> Any:
    return page.locator("#job-live .badge")


def _sign_in(page: Any, server: Server) -> None:
    page.goto(f"{server.url}/jobs")
    assert "/signin" in page.url
    page.fill("#api_key", server.key)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(re.compile(r"/jobs$"))


def test_train_watch_promote_score_cancel_and_schedule(
    page: Any, server: Server, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    problems: list[str] = []  # console errors, CSP violations among them
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )

    _sign_in(page, server)
    expect(page.locator(".who .owner")).to_have_text("alice")

    # Upload a CSV; the XHR path shows progress, then lands on the list with the dataset.
    page.goto(f"{server.url}/datasets")
    page.set_input_files("#file", str(_blobs_csv(tmp_path / "blobs.csv")))
    page.fill("#name", "blobs")
    page.click("#upload-form button[type=submit]")
    expect(page.locator(".flash")).to_contain_text("Uploaded blobs: 2,000 rows")
    expect(page.locator("table.table")).to_contain_text("blobs")

    # Train on it through the form; the hyper-parameters start at TrainSpec's defaults.
    page.goto(f"{server.url}/jobs/new/train")
    expect(page.locator("#f-lr")).to_have_value("0.003")
    _shoot(page, "new-training-form")
    # Only the chosen architecture's parameters are in view; switching moves them in.
    hidden, channels = (
        page.locator('[id="f-arch_params.hidden"]'),
        page.locator('[id="f-arch_params.channels"]'),
    )
    expect(hidden).to_be_visible()
    expect(channels).to_be_hidden()
    page.select_option("#f-arch", "cnn")
    expect(channels).to_be_visible()
    expect(hidden).to_be_hidden()
    page.select_option("#f-arch", "mlp")
    expect(page.locator("#f-lr_schedule")).to_be_hidden()  # under Advanced, closed
    page.fill("#f-model_name", "blobs-mlp")
    page.select_option("#f-dataset", label="blobs (2,000 rows)")
    # Long enough that the page, polling every 2 s, sees the job running with points (15
    # epochs once finished within the first poll on a fast machine).
    page.fill("#f-epochs", "300")
    page.fill("#f-batch_size", "16")
    page.click("button:has-text('Submit job')")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    job_url = page.url

    # The chart grows while the job runs (htmx and Chart.js polling, no reload).
    seen = page.wait_for_function(_CHART_GREW, timeout=120_000).json_value()
    assert seen["state"] == "running", seen
    assert seen["points"] >= 2
    expect(page.locator("figure.chart[data-family=loss] canvas")).to_be_visible()
    expect(page.locator("figure.chart[data-family=accuracy] canvas")).to_be_visible()
    expect(page.locator("#job-message")).to_contain_text("epoch")

    expect(_badge(page)).to_have_text("succeeded", timeout=240_000)
    expect(page.locator("#charts")).to_have_attribute("data-done", "1")
    expect(page.locator("#job-live")).to_contain_text("Registered blobs-mlp version 1")
    assert page.url == job_url  # it all happened in place
    # The log box shows its newest lines (one per epoch: far more than it holds).
    page.wait_for_function(_LOG_AT_TAIL, timeout=10_000)
    _shoot(page, "job-page")

    # Resubmit opens the form filled with this job's spec; a shorter run makes version 2.
    page.click("text=Resubmit…")
    expect(page.locator("#f-model_name")).to_have_value("blobs-mlp")
    expect(page.locator("#f-epochs")).to_have_value("300")
    page.fill("#f-epochs", "4")
    page.click("button:has-text('Submit job')")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    expect(_badge(page)).to_have_text("succeeded", timeout=240_000)
    expect(page.locator("#job-live")).to_contain_text("Registered blobs-mlp version 2")

    # Promote version 1 to production on the models page, where both versions sit side by side.
    page.goto(f"{server.url}/models")
    versions = page.locator("tbody tr")
    expect(versions).to_have_count(2)
    versions.nth(1).locator("button:has-text('Promote to production')").click()
    expect(page.locator(".aliases")).to_contain_text("production → v1")
    expect(page.locator("tbody tr").nth(1)).to_contain_text("production")
    _shoot(page, "models")

    # Batch-score the uploaded CSV with the production version, then download the output.
    page.goto(f"{server.url}/jobs/new/batch_predict")
    page.fill("#f-model", "no-such-model")  # the version list offers no other model's versions
    assert page.locator("#f-version option:not([hidden])").all_text_contents() == ["latest"]
    page.fill("#f-model", "blobs-mlp")
    page.select_option("#f-version", "production")
    page.select_option("#f-dataset", label="blobs (2,000 rows)")
    page.fill("#f-passthrough", "label")
    page.select_option("#f-output_format", "csv")
    page.click("button:has-text('Submit job')")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    batch_url = page.url
    expect(_badge(page)).to_have_text("succeeded", timeout=120_000)
    expect(page.locator("#job-live")).to_contain_text("Used blobs-mlp version 1")
    assert page.locator("#charts-card").count() == 0  # a batch job reports no metrics
    with page.expect_download() as downloading:
        page.click("#download-output")
    download = downloading.value
    assert download.suggested_filename.endswith("-output.csv")
    with open(download.path(), newline="") as scored:
        rows_out = list(csv.DictReader(scored))
    assert len(rows_out) == 2000  # one output row per input row
    assert {"label", "prediction", "score"} <= set(rows_out[0])
    assert page.locator("#download-errors").count() == 0  # every row was scored

    # A long job, cancelled from its page while it runs.
    page.goto(f"{server.url}/jobs/new/train")
    page.fill("#f-model_name", "never-finishes")
    page.fill("#f-epochs", "10000")
    page.click("button:has-text('Submit job')")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    expect(_badge(page)).to_have_text("running", timeout=120_000)
    page.click("button:has-text('Cancel job')")
    expect(_badge(page)).to_have_text("cancelled", timeout=60_000)

    page.goto(f"{server.url}/jobs")
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(4)
    expect(rows.nth(0).locator(".badge")).to_have_text("cancelled")
    expect(rows.nth(1)).to_contain_text("batch_predict")
    for n in (1, 2, 3):
        expect(rows.nth(n).locator(".badge")).to_have_text("succeeded")
    _shoot(page, "jobs")

    # Schedule the scoring nightly, from its job's settings (no scheduler runs here, so the
    # schedule only shows its next run times and submits nothing).
    page.goto(batch_url)
    page.click("text=Schedule this…")
    expect(page.locator("#f-model")).to_have_value("blobs-mlp")
    page.fill("#f-name", "nightly-scoring")
    page.fill("#f-cron", "0 3 * * *")
    page.click("button:has-text('Create schedule')")
    page.wait_for_url(re.compile(r"/schedules#schedule-[0-9a-f]{32}$"))
    expect(page.locator(".flash")).to_contain_text("Schedule nightly-scoring created")
    schedule = page.locator("#schedules-table tbody tr", has_text="nightly-scoring")
    expect(schedule).to_contain_text("0 3 * * *")
    expect(schedule.locator(".badge")).to_have_text("active")
    expect(schedule.locator(".next-runs div")).to_have_count(3)
    expect(schedule.locator(".next-runs div").first).to_contain_text("03:00:00 UTC")
    _shoot(page, "schedules")

    assert problems == []


def test_sign_out_ends_the_session(page: Any, server: Server) -> None:
    _sign_in(page, server)
    page.click("button:has-text('Sign out')")
    page.wait_for_url(re.compile(r"/signin"))
    page.goto(f"{server.url}/models")
    assert "/signin" in page.url


def test_forms_work_without_javascript(browser: Any, server: Server) -> None:
    """Sign in, submit a job, create and pause a schedule with scripts disabled: plain
    form posts all the way."""
    from playwright.sync_api import expect

    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    try:
        _sign_in(page, server)
        page.goto(f"{server.url}/jobs/new/echo")
        page.fill("#f-message", "no scripts needed")
        page.click("button:has-text('Submit job')")
        page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
        assert "no scripts needed" in page.content()

        page.goto(f"{server.url}/schedules/new/echo")
        page.fill("#f-name", "hourly-echo")
        page.fill("#f-cron", "0 * * * *")
        page.fill("#f-message", "on the hour")
        page.click("button:has-text('Create schedule')")
        page.wait_for_url(re.compile(r"/schedules#schedule-[0-9a-f]{32}$"))
        row = page.locator("#schedules-table tbody tr", has_text="hourly-echo")
        row.locator("button:has-text('Pause')").click()
        expect(row.locator(".badge")).to_have_text("paused")
        expect(page.locator(".flash")).to_contain_text("Paused hourly-echo.")
    finally:
        context.close()
