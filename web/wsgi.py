"""The WSGI entry point for gunicorn: `gunicorn web.wsgi:app`."""

from kiln import logs
from kiln.settings import Settings
from web import create_app

settings = Settings()
logs.configure(settings.log_format)
app = create_app(settings)
