"""The retention sweeper (workers/sweeper.py) on SQLite and PostgreSQL with real files: it
expires what is due, removes orphans past the grace period, keeps lineage and what live jobs
need, and a dry run removes nothing while naming everything that would go."""

from __future__ import annotations

from datetime import timedelta

import pytest
from click.testing import CliRunner

from db.base import utcnow
from db.models import JobEvent, Metric
from kiln.states import JobState
from tests.retentionkit import (
    age,
    count,
    dataset,
    finished_job,
    job_row,
    live_job,
    output_result,
    put,
    register,
    scratch,
    store_of,
)
from workers.sweeper import SweepReport, sweep

DAY = 86400


def run(sessions, settings, *, dry_run=False, after_s: float = 0) -> SweepReport:
    """One sweep, as if `after_s` seconds from now."""
    now = utcnow() + timedelta(seconds=after_s)
    return sweep(sessions, settings, store_of(settings), dry_run=dry_run, now=now)


def removed(report: SweepReport, kind: str) -> set[str]:
    return {r.what for r in report.removals if r.kind == kind}


# --- expiry -----------------------------------------------------------------------------------


def test_a_job_past_its_expiry_loses_its_output_log_and_scratch_but_stays_a_record(
    sessions, settings
):
    output = put(settings, b"id,label\n1,yes\n")
    job = finished_job(sessions, result=output_result(output), expires_after_s=3600)
    folder = scratch(settings, job.id)

    report = run(sessions, settings, after_s=3601)

    assert removed(report, "job") == {job.id}
    assert removed(report, "artifact") == {output.digest}
    assert not store_of(settings).path(output.digest).exists()
    assert not folder.exists()
    row = job_row(sessions, job.id)
    assert row is not None
    assert row.expired
    assert row.result == output_result(output)
    assert count(sessions, JobEvent, job.id) == 0
    assert count(sessions, Metric, job.id) == 1  # the record keeps its figures


def test_a_job_before_its_expiry_is_untouched(sessions, settings):
    output = put(settings, b"kept output")
    job = finished_job(sessions, result=output_result(output), expires_after_s=3600)

    report = run(sessions, settings, after_s=3500)

    assert report.removals == []
    assert store_of(settings).path(output.digest).exists()
    assert not job_row(sessions, job.id).expired
    assert count(sessions, JobEvent, job.id) == 1


def test_an_expired_jobs_output_download_says_it_expired(client, alice, sessions, settings):
    job = finished_job(sessions, result=output_result(put(settings, b"out")), expires_after_s=60)
    report = run(sessions, settings, after_s=61)

    response = client.get(f"/api/v1/jobs/{job.id}/output", headers=alice)
    shown = client.get(f"/api/v1/jobs/{job.id}", headers=alice).get_json()

    assert response.status_code == 404
    assert response.get_json()["code"] == "no_output"
    row = job_row(sessions, job.id)
    assert row is not None
    assert row.expires_at is not None
    assert row.expired_at is not None
    until = row.expires_at.isoformat(timespec="seconds")
    # The sweep's line and the 404 use the same words for the same time (expires_at).
    (swept,) = [r.why for r in report.removals if r.kind == "job"]
    assert swept == f"kept until {until}; log lines"
    assert response.get_json()["detail"] == (
        f"job {job.id} expired: it was kept until {until}; its files were removed at "
        f"{row.expired_at.isoformat(timespec='seconds')}"
    )
    assert shown["expired"] is True


def test_a_job_from_before_retention_is_given_the_retention_days(sessions, settings):
    job = finished_job(sessions, result=output_result(put(settings, b"old")), expires_after_s=None)
    assert job.expires_at is None
    settings = settings.model_copy(update={"retention_days": 2.0})

    early = run(sessions, settings, after_s=2 * DAY - 60)
    stamped = job_row(sessions, job.id)
    late = run(sessions, settings, after_s=2 * DAY + 60)

    assert early.removals == []
    assert stamped.expires_at == stamped.finished_at + timedelta(days=2)
    assert removed(late, "job") == {job.id}


# --- lineage and what live jobs need ----------------------------------------------------------


def test_a_version_outlives_the_job_that_trained_it(client, alice, sessions, settings):
    job = finished_job(sessions, kind="train", result={"model": "m", "version": 1})
    version = register(sessions, settings, "m", b"trained weights", source_job_id=job.id)
    age(store_of(settings).path(version.artifact_digest), 40 * DAY)

    run(sessions, settings, after_s=40 * DAY)

    assert job_row(sessions, job.id).expired
    assert store_of(settings).path(version.artifact_digest).exists()
    shown = client.get("/api/v1/models/m/versions/1", headers=alice).get_json()
    assert shown["source_job_id"] == job.id


def test_what_a_queued_job_needs_is_kept_however_old(sessions, settings):
    version = register(sessions, settings, "m", b"weights")
    data = dataset(sessions, settings, b"a,b,c\n1,2,3\n")
    source = finished_job(sessions, kind="train", state=JobState.CANCELLED, expires_after_s=60)
    checkpoint = scratch(settings, source.id)
    live_job(sessions, {"model": "m", "version": 1, "dataset": data.id}, kind="batch_predict")
    live_job(sessions, {"model_name": "m", "resume_from": source.id}, kind="train")
    for digest in (version.artifact_digest, data.digest):
        age(store_of(settings).path(digest), 40 * DAY)
    age(checkpoint, 40 * DAY)

    report = run(sessions, settings, after_s=40 * DAY)

    assert report.removals == []
    assert [held for held, _ in report.held] == [source.id]
    assert store_of(settings).path(version.artifact_digest).exists()
    assert store_of(settings).path(data.digest).exists()
    assert checkpoint.exists()
    assert not job_row(sessions, source.id).expired


# --- orphans ----------------------------------------------------------------------------------


def test_an_artifact_nothing_refers_to_goes_once_past_the_grace_period(sessions, settings):
    old = put(settings, b"an upload that never became a row")
    young = put(settings, b"an upload being recorded right now")
    age(old.path, settings.sweep_grace_s + 60)

    report = run(sessions, settings)

    assert removed(report, "artifact") == {old.digest}
    assert not old.path.exists()
    assert young.path.exists()


def test_storing_the_same_bytes_again_makes_an_old_orphan_young(sessions, settings):
    old = put(settings, b"the same bytes")
    age(old.path, settings.sweep_grace_s + 60)

    put(settings, b"the same bytes")  # a new upload, its row not committed yet
    report = run(sessions, settings)

    assert report.removals == []
    assert old.path.exists()


def test_scratch_of_a_missing_or_expired_job_goes_but_a_live_jobs_stays(sessions, settings):
    missing = scratch(settings, "a" * 32)
    expired_job = finished_job(sessions, expires_after_s=60)
    running = live_job(sessions, {"message": "hi"}, kind="echo", running=True)
    finished = finished_job(sessions, expires_after_s=DAY)
    young = scratch(settings, "b" * 32)
    kept = [scratch(settings, running.id), scratch(settings, finished.id)]
    run(sessions, settings, after_s=61)  # expires expired_job
    late = scratch(settings, expired_job.id)  # left behind by a worker after the expiry
    for folder in [missing, late, *kept]:
        age(folder, settings.sweep_grace_s + 60)

    report = run(sessions, settings)

    assert removed(report, "scratch") == {str(missing), str(late)}
    assert not missing.exists()
    assert not late.exists()
    assert young.exists()
    assert all(folder.exists() for folder in kept)


# --- dry run ----------------------------------------------------------------------------------


def test_a_dry_run_removes_nothing_and_lists_what_a_real_sweep_removes(sessions, settings):
    output = put(settings, b"expiring output")
    job = finished_job(sessions, result=output_result(output), expires_after_s=60)
    job_scratch = scratch(settings, job.id)
    orphan = put(settings, b"orphan")
    orphan_scratch = scratch(settings, "c" * 32)
    age(orphan.path, 2 * DAY)
    age(orphan_scratch, 2 * DAY)

    dry = run(sessions, settings, dry_run=True, after_s=120)

    assert removed(dry, "job") == {job.id}
    assert removed(dry, "artifact") == {output.digest, orphan.digest}
    assert removed(dry, "scratch") == {str(job_scratch), str(orphan_scratch)}
    assert output.path.exists()
    assert orphan.path.exists()
    assert job_scratch.exists()
    assert orphan_scratch.exists()
    row = job_row(sessions, job.id)
    assert not row.expired
    assert row.expires_at is not None
    assert count(sessions, JobEvent, job.id) == 1

    real = run(sessions, settings, after_s=120)

    assert {(r.kind, r.what) for r in real.removals} == {(r.kind, r.what) for r in dry.removals}
    assert not output.path.exists()
    assert not orphan.path.exists()


def test_kiln_sweep_dry_run_prints_what_would_go(sessions, settings, monkeypatch):
    from kiln.cli import main

    orphan = put(settings, b"orphan for the command")
    age(orphan.path, 2 * DAY)
    monkeypatch.setenv("KILN_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("KILN_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("KILN_LOG_FORMAT", "text")

    dry = CliRunner().invoke(main, ["sweep", "--dry-run"], catch_exceptions=False)
    kept = orphan.path.exists()
    real = CliRunner().invoke(main, ["sweep"], catch_exceptions=False)

    assert dry.exit_code == 0
    assert f"artifact {orphan.digest}" in dry.stdout
    assert "would remove: 0 job, 1 artifact" in dry.stderr
    assert kept
    assert real.exit_code == 0
    assert "removed: 0 job, 1 artifact" in real.stderr
    assert not orphan.path.exists()


@pytest.mark.parametrize("retention_days", [0, -1])
def test_the_retention_days_must_be_positive(retention_days):
    from pydantic import ValidationError

    from kiln.settings import Settings

    with pytest.raises(ValidationError):
        Settings(retention_days=retention_days)


def test_a_scheduled_job_gets_the_retention_it_is_fired_with(sessions):
    from db import keys, schedules
    from workers.scheduler import fire_due

    now = utcnow()
    with sessions() as session:
        keys.create(session, owner="alice")
        schedule = schedules.create(
            session, owner="alice", name="nightly", cron="0 * * * *", kind="echo",
            spec={"message": "hi"}, priority=0, enabled=True,
        )  # fmt: skip
        schedule.next_run_at = now - timedelta(minutes=1)
        session.commit()

    [job] = fire_due(
        sessions, lambda job, countdown=0.0: None, max_queued=10, expires_after_s=7 * DAY
    )

    assert job_row(sessions, job.id).expires_after_s == 7 * DAY
