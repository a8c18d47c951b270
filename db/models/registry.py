"""Model and ModelVersion: the registry of trained models and their weights."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import Base, UTCDateTime, new_id, utcnow


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("owner", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: {"production": 3, ...}: alias name to version number.
    aliases: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    #: The highest version number ever given: numbers are never reused after a delete, so
    #: "version 3" always means the same weights.
    last_number: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.number"
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "number"),
        # One version per training job: a redelivered job can never register twice.
        UniqueConstraint("source_job_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    source_job_id: Mapped[str | None] = mapped_column(String(32))
    arch: Mapped[str] = mapped_column(String(32))
    #: What prediction needs besides the weights: arch params, feature names,
    #: normalisation, label names.
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    #: sha256 of the safetensors file, its address in the artifact store.
    artifact_digest: Mapped[str] = mapped_column(String(64))
    artifact_size: Mapped[int] = mapped_column(BigInteger)
    #: sha256 of the dataset file it was trained on; a dataset is kept while one refers to it.
    dataset_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    #: Where the version came from: {"origin": "train" | "upload" | "optimize", "spec": the
    #: job's spec (dataset, target, split seed...), "source_version": n (optimize only)}.
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    #: Exported copies made by export jobs: {"torchscript": {"digest": ..., "size": ...}}.
    exports: Mapped[dict[str, dict[str, Any]]] = mapped_column(
        JSON, default=dict, server_default="{}"
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Which loader reads the artifact (kiln/families.py): `zoo` (one safetensors file and
    #: `config`) or `hf` (a transformers model directory, stored as one tar).
    family: Mapped[str] = mapped_column(String(16), default="zoo", server_default="zoo")
    #: An hf version's task (embedding, text-classification, ...); None for zoo.
    task: Mapped[str | None] = mapped_column(String(32), default=None)

    model: Mapped[Model] = relationship(back_populates="versions")

    @property
    def feature_names(self) -> list[str]:
        """The input schema: the features a row must carry, in order."""
        return list(self.config.get("feature_names", []))

    @property
    def label_names(self) -> list[str]:
        return list(self.config.get("label_names", []))
