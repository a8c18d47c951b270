"""API keys: create (shown once), authenticate by digest, revoke, and the admin bootstrap key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.base import utcnow
from db.models import ApiKey
from kiln.errors import NotFound

_PREFIX_LEN = 12
#: last_used_at is written at most this often per key, so reads stay reads.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(session: Session, owner: str, role: str = "user") -> tuple[ApiKey, str]:
    """Create a key; returns the row and the key itself, which is never stored in clear."""
    plaintext = "kiln_" + secrets.token_urlsafe(32)
    return _store(session, plaintext, owner, role), plaintext


def _store(session: Session, plaintext: str, owner: str, role: str) -> ApiKey:
    row = ApiKey(
        prefix=plaintext[:_PREFIX_LEN],
        key_hash=digest(plaintext),
        owner=owner,
        role=role,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def ensure_admin(session: Session, plaintext: str) -> ApiKey:
    """Make sure an admin key with exactly this value exists (KILN_ADMIN_KEY)."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest(plaintext)))
    if row is None:
        return _store(session, plaintext, owner="admin", role="admin")
    row.role, row.revoked_at = "admin", None
    return row


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key with this value, or None."""
    wanted = digest(plaintext)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == wanted))
    # The lookup is by digest; compare again in constant time so no timing difference
    # depends on how much of a guessed key was right.
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, wanted):
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        row.last_used_at = now
    return row


def revoke(session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    row.revoked_at = row.revoked_at or utcnow()
    return row


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))
