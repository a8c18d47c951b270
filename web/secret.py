"""The key that signs the UI's session cookie: KILN_SECRET_KEY, or one kept in the data dir."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from kiln.settings import Settings


def secret_key(settings: Settings) -> str:
    """KILN_SECRET_KEY when set; otherwise data_dir/secret_key, created on first use."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.data_dir / "secret_key"
    if not path.exists():
        _create(path)
    return path.read_text().strip()


def _create(path: Path) -> None:
    # Several web processes may start at once: each writes a whole candidate file and
    # hard-links it into place; link() fails if another won, and the winner's key is used.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
