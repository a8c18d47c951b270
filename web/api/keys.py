"""API keys, for admins: create (the key is shown once), list, revoke."""

from __future__ import annotations

from flask import Response

from db import keys
from kiln.schemas import KeyList, KeyOut, KeyRequest, NewKeyOut
from web import session
from web.api import bp
from web.api.body import answer, parse
from web.auth import require_admin


@bp.post("/keys")
@require_admin
def create_key() -> Response:
    wanted = parse(KeyRequest)
    db = session.get()
    row, plaintext = keys.create(db, owner=wanted.owner, role=wanted.role)
    db.commit()
    body = NewKeyOut(**KeyOut.model_validate(row).model_dump(), key=plaintext)
    return answer(body, 201)


@bp.get("/keys")
@require_admin
def list_keys() -> Response:
    found = keys.list_keys(session.get())
    return answer(KeyList(keys=[KeyOut.model_validate(k) for k in found]))


@bp.delete("/keys/<key_id>")
@require_admin
def revoke_key(key_id: str) -> Response:
    db = session.get()
    row = keys.revoke(db, key_id)
    db.commit()
    return answer(KeyOut.model_validate(row))
