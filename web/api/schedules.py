"""Schedules: create, list, read, pause, resume and delete cron schedules of job templates."""

from __future__ import annotations

from flask import Response

from db import schedules
from db.models import Schedule
from kiln.schemas import ScheduleList, ScheduleOut, ScheduleRequest
from web import session, webhooks
from web.api import bp
from web.api.body import answer, parse
from web.auth import principal

_UPCOMING = 3


@bp.post("/schedules")
def create_schedule() -> Response:
    wanted = parse(ScheduleRequest)
    db = session.get()
    schedule = schedules.create(
        db,
        owner=principal().owner,
        name=wanted.name,
        cron=wanted.cron,
        kind=wanted.kind,
        spec=wanted.spec,
        priority=wanted.priority,
        enabled=wanted.enabled,
        webhook=webhooks.checked(wanted.webhook),
        tags=wanted.tags,
        deadline_s=wanted.deadline_s,
        expires_after_s=wanted.expires_after,
    )
    db.commit()
    return answer(_out(schedule), 201, {"Location": f"/api/v1/schedules/{schedule.id}"})


@bp.get("/schedules")
def list_schedules() -> Response:
    found = schedules.listed(session.get(), principal().visible_owner)
    return answer(ScheduleList(schedules=[_out(s) for s in found]))


@bp.get("/schedules/<schedule_id>")
def get_schedule(schedule_id: str) -> Response:
    return answer(_out(_owned(schedule_id)))


@bp.post("/schedules/<schedule_id>/pause")
def pause_schedule(schedule_id: str) -> Response:
    return _set_enabled(schedule_id, enabled=False)


@bp.post("/schedules/<schedule_id>/resume")
def resume_schedule(schedule_id: str) -> Response:
    return _set_enabled(schedule_id, enabled=True)


@bp.delete("/schedules/<schedule_id>")
def delete_schedule(schedule_id: str) -> Response:
    db = session.get()
    db.delete(_owned(schedule_id))
    db.commit()
    return Response(status=204)


def _set_enabled(schedule_id: str, *, enabled: bool) -> Response:
    db = session.get()
    schedule = schedules.set_enabled(db, _owned(schedule_id), enabled)
    db.commit()
    return answer(_out(schedule))


def _owned(schedule_id: str) -> Schedule:
    return schedules.get_owned(session.get(), schedule_id, principal().visible_owner)


def _out(schedule: Schedule) -> ScheduleOut:
    out = ScheduleOut.model_validate(schedule)
    if not schedule.enabled:
        return out.model_copy(update={"next_run_at": None})
    after = schedule.next_run_at
    following = schedules.upcoming(schedule.cron, after, _UPCOMING - 1)
    return out.model_copy(update={"upcoming": [after, *following]})
