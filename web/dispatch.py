"""The web's broker: the sender that db.submission uses, and the readiness probe.

The web never imports workers/ (nor torch): it names the task and the queue, nothing more.
"""

from __future__ import annotations

from celery import Celery
from flask import Flask, current_app

from kiln.broker import Sender, celery_sender, make_celery
from kiln.settings import Settings

__all__ = ["Sender", "broker_reachable", "init_app", "sender"]


def init_app(app: Flask, settings: Settings, sender: Sender | None) -> None:
    """Send with Celery, or with `sender` (tests that record what was sent)."""
    if sender is None:
        celery = make_celery(settings)
        app.extensions["kiln.celery"] = celery
        sender = celery_sender(celery)
    app.extensions["kiln.sender"] = sender


def sender() -> Sender:
    """The app's sender; call it through db.submission.commit_and_send, after the commit."""
    send: Sender = current_app.extensions["kiln.sender"]
    return send


def broker_reachable() -> bool:
    celery: Celery | None = current_app.extensions.get("kiln.celery")
    if celery is None:
        return True
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception:
        return False
    return True
