"""Template filters: times, durations and sizes as people read them."""

from __future__ import annotations

from datetime import datetime

from db.base import utcnow
from web.ui import bp


@bp.app_template_filter("when")
def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


@bp.app_template_filter("duration")
def duration(job: object) -> str:
    """How long a job ran (or has been running)."""
    started: datetime | None = getattr(job, "started_at", None)
    if started is None:
        return "—"
    finished: datetime | None = getattr(job, "finished_at", None)
    seconds = int(((finished or utcnow()) - started).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


@bp.app_template_filter("size")
def size(count: int | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@bp.app_template_filter("number")
def number(value: object) -> str:
    """Metrics to four significant figures; anything else as it is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@bp.app_template_filter("rows")
def rows(count: int) -> str:
    """A row count as people say it: "1 row", "12,345 rows"."""
    return f"{count:,} row" if count == 1 else f"{count:,} rows"
