"""ORM models; importing this package registers every table on Base.metadata."""

from db.models.auth import ApiKey
from db.models.datasets import Dataset
from db.models.jobs import Job, JobEvent, JobTag, Metric
from db.models.registry import Model, ModelVersion
from db.models.schedules import Schedule
from db.models.webhooks import WebhookDelivery, WebhookMessage, WebhookSecret

__all__ = [
    "ApiKey",
    "Dataset",
    "Job",
    "JobEvent",
    "JobTag",
    "Metric",
    "Model",
    "ModelVersion",
    "Schedule",
    "WebhookDelivery",
    "WebhookMessage",
    "WebhookSecret",
]
