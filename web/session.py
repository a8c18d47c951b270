"""One SQLAlchemy session per request, on flask.g, committed by the view and closed at teardown."""

from __future__ import annotations

from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_sessionmaker
from kiln.settings import Settings


def init_app(app: Flask, settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url)
    app.extensions["kiln.engine"] = engine
    app.extensions["kiln.sessions"] = make_sessionmaker(engine)
    app.teardown_appcontext(_close)


def engine() -> Engine:
    return current_app.extensions["kiln.engine"]


def get() -> Session:
    """The request's session, opened on first use."""
    if "db" not in g:
        factory: sessionmaker[Session] = current_app.extensions["kiln.sessions"]
        g.db = factory()
    return g.db


def _close(exc: BaseException | None) -> None:
    db: Session | None = g.pop("db", None)
    if db is not None:
        if exc is not None:
            db.rollback()
        db.close()
