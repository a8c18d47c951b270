"""Dataset: an uploaded file, parsed once at upload, stored as an immutable artifact."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, UTCDateTime, new_id, utcnow


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    rows: Mapped[int] = mapped_column(BigInteger)
    #: [{"name": ..., "dtype": ...}] in file order.
    columns: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: sha256 of the file, which is also its address in the artifact store.
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
