"""Celery workers: the only part of Kiln that imports torch."""
