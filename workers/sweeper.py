"""The sweeper: removes what retention says may go, and nothing that is still needed.

One sweep (the scheduler runs one every KILN_SWEEP_INTERVAL_S; `kiln sweep` runs one now):

1. expires finished jobs past their `expires_at`: their log lines, output files (unless
   another row shares the file) and own files (kiln.job_space: scratch folder, per-job
   store prefix) go; the row stays, marked expired. A job a live job resumes from waits.
2. removes scratch folders on this host whose job is gone or expired, once older than
   KILN_SWEEP_GRACE_S.
3. removes artifacts no row refers to (no dataset, model version, export or unexpired job
   output), once older than KILN_SWEEP_GRACE_S: an upload is stored before its row is
   committed, a job's output before its result is written, and the grace covers both.

Lineage holds: model versions are never touched here (their weights are referenced rows),
so a version outlives the job that trained it, and a queued job's dataset and model
version are referenced rows too. With `dry_run` the same decisions are made in a
transaction that is rolled back, and nothing is removed: the report lists what would go.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import references, retention
from db.base import utcnow
from db.engine import session_scope
from kiln import job_space
from kiln.artifacts import ArtifactStore
from kiln.settings import Settings

log = logging.getLogger(__name__)

#: Jobs expired per transaction (a backlog is worked through in several).
_BATCH = 500


@dataclass(frozen=True)
class Removal:
    #: "job" (expired: its log lines went), "artifact" (a digest), "scratch" (a folder) or
    #: "stored" (a key under a job's prefix of the artifact store).
    kind: str
    what: str
    why: str

    def line(self) -> str:
        return f"{self.kind:<8} {self.what}  ({self.why})"


@dataclass
class SweepReport:
    dry_run: bool
    removals: list[Removal] = field(default_factory=list)
    #: Jobs past their expiry kept because a live job resumes from them: (job, live job).
    held: list[tuple[str, str]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.removals if r.kind == kind)


def sweep(
    sessions: sessionmaker[Session],
    settings: Settings,
    store: ArtifactStore,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> SweepReport:
    """One sweep; see the module's docstring. Returns what went (or, dry, would go)."""
    now = now or utcnow()
    report = SweepReport(dry_run)
    _expire_jobs(sessions, settings, store, report, now)
    _remove_orphan_scratch(sessions, settings, store, report, now)
    _remove_orphan_artifacts(sessions, settings, store, report, now)
    return report


def _expire_jobs(
    sessions: sessionmaker[Session],
    settings: Settings,
    store: ArtifactStore,
    report: SweepReport,
    now: datetime,
) -> None:
    session = sessions()
    expired: list[tuple[str, list[str]]] = []
    try:
        while retention.stamp_expiry(session, settings.retention_s):
            if not report.dry_run:
                session.commit()
        held = retention.resumed_from(session)
        while batch := retention.due(session, now, limit=_BATCH, keep=held.keys()):
            for job in batch:
                digests = retention.expire(session, job, now)
                expired.append((job.id, digests))
                # The same words as the API's 404 (web/storage.py): "kept until" is expires_at.
                until = (job.expires_at or now).isoformat(timespec="seconds")
                report.removals.append(Removal("job", job.id, f"kept until {until}; log lines"))
            if not report.dry_run:
                session.commit()
        report.held = sorted(
            (j.id, held[j.id]) for j in retention.due(session, now) if j.id in held
        )
    finally:
        session.rollback()  # dry: forget every decision; otherwise all was committed
        session.close()
    for job_id, digests in expired:
        for digest in digests:
            if _discard(sessions, store, digest, report.dry_run):
                report.removals.append(Removal("artifact", digest, f"output of job {job_id}"))
        for kind, what in job_space.remove(settings.data_dir, store, job_id, report.dry_run):
            report.removals.append(Removal(kind, what, f"files of job {job_id}"))


def _remove_orphan_scratch(
    sessions: sessionmaker[Session],
    settings: Settings,
    store: ArtifactStore,
    report: SweepReport,
    now: datetime,
) -> None:
    cutoff = now - timedelta(seconds=settings.sweep_grace_s)
    old = [f for f in job_space.scratch_folders(settings.data_dir) if f.modified <= cutoff]
    with session_scope(sessions) as session:
        orphans = retention.expired_or_missing(session, [f.job_id for f in old])
        orphans -= retention.resumed_from(session).keys()
    for folder in old:
        if folder.job_id in orphans:
            why = f"job {folder.job_id} is gone or expired"
            for kind, what in job_space.remove(
                settings.data_dir, store, folder.job_id, report.dry_run
            ):
                report.removals.append(Removal(kind, what, why))


def _remove_orphan_artifacts(
    sessions: sessionmaker[Session],
    settings: Settings,
    store: ArtifactStore,
    report: SweepReport,
    now: datetime,
) -> None:
    cutoff = now - timedelta(seconds=settings.sweep_grace_s)
    with session_scope(sessions) as session:
        referenced = references.referenced(session)
    already = {r.what for r in report.removals if r.kind == "artifact"}
    for digest, stored_at in store.listed():
        if digest in referenced or digest in already or stored_at > cutoff:
            continue
        if _discard(sessions, store, digest, report.dry_run):
            why = f"referenced by nothing, stored {stored_at.isoformat(timespec='seconds')}"
            report.removals.append(Removal("artifact", digest, why))


def _discard(
    sessions: sessionmaker[Session], store: ArtifactStore, digest: str, dry_run: bool
) -> bool:
    """Remove an artifact if, asked again just now, no row refers to it (a row committed
    since the decision, an upload of the same bytes, say, keeps it). True if it went, or
    (dry) would go: a dry run's decisions were rolled back, so they are not asked again."""
    if dry_run:
        return True
    with session_scope(sessions) as session:
        if references.digest_in_use(session, digest):
            return False
    store.discard(digest)
    return True


def log_report(report: SweepReport) -> None:
    """The sweep's outcome as log lines (the scheduler's)."""
    for removal in report.removals:
        log.info("event=swept kind=%s what=%s why=%s", removal.kind, removal.what, removal.why)
    for job_id, live in report.held:
        log.info("event=expiry_held job=%s resumed_by=%s", job_id, live)
