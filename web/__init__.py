"""create_app(): build the Flask app from Settings; nothing happens at import time."""

from __future__ import annotations

from flask import Flask

from kiln.settings import Settings
from web import (
    dispatch,
    errors,
    headers,
    job_streams,
    limits,
    metrics,
    request_guard,
    session,
    ui,
)
from web.api import bp as api_bp
from web.health import bp as health_bp


def create_app(settings: Settings | None = None, sender: dispatch.Sender | None = None) -> Flask:
    """The web app. `sender` replaces the Celery sender (tests that inspect what was sent)."""
    settings = settings or Settings()
    app = Flask(__name__)
    app.config["KILN_SETTINGS"] = settings
    # Werkzeug refuses bodies past this before Kiln reads them; uploads stream below it.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + 1024 * 1024
    session.init_app(app, settings)
    dispatch.init_app(app, settings, sender)
    job_streams.init_app(app, settings)
    errors.init_app(app)
    request_guard.init_app(app)
    metrics.init_app(app)
    app.register_blueprint(health_bp)
    app.register_blueprint(api_bp)
    ui.init_app(app, settings)
    limits.init_app(app, settings, api_bp, ui.bp)
    headers.init_app(app)
    return app
