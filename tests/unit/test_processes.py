"""kiln.supervise's parent-death signal and kiln.embedded's Redis: real processes, no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import redis

from kiln.embedded import SOCKET_PATH_MAX, EmbeddedRedisError, socket_path, start_redis

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

#: A parent that starts one child the way the Supervisor does, prints its pid, then waits.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from kiln.supervise import child_setup
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        start_new_session=True, preexec_fn=child_setup(),
    )
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


def test_a_child_dies_when_its_parent_is_killed_with_sigkill() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env
    )
    assert parent.stdout is not None
    with parent.stdout:
        child = psutil.Process(int(parent.stdout.readline()))
    try:
        assert child.is_running()
        parent.kill()
        parent.wait()
        # In its own session nothing signals it but the kernel's parent-death signal.
        _, alive = psutil.wait_procs([child], timeout=30)
        assert alive == []
    finally:
        if child.is_running():
            child.kill()


def test_die_with_parent_signals_at_once_when_the_parent_is_already_gone() -> None:
    probe = (
        "import signal, os\n"
        "from kiln.supervise import die_with_parent\n"
        "die_with_parent(signal.SIGUSR1, os.getppid() + 1_000_000)\n"
        "print('survived')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert done.returncode == -signal.SIGUSR1
    assert "survived" not in done.stdout


def test_a_data_dir_too_long_for_a_socket_is_refused_with_what_to_do(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (SOCKET_PATH_MAX - len(str(tmp_path))))
    with pytest.raises(EmbeddedRedisError, match=r"KILN_DATA_DIR.*KILN_REDIS_URL"):
        socket_path(deep)
    assert socket_path(tmp_path) == tmp_path.resolve() / "redis.sock"


def test_embedded_redis_keeps_its_files_in_its_folder_and_refuses_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative folder, as the default KILN_DATA_DIR (var)
    server = start_redis(Path("redis"))
    try:
        assert server.url == f"redis+socket://{tmp_path.resolve()}/redis/redis.sock"
        client = redis.Redis(unix_socket_path=str(server.socket))
        assert client.set("k", "v")
        client.close()
        with pytest.raises(EmbeddedRedisError, match="another `kiln run`"):
            start_redis(tmp_path / "redis")
        assert psutil.Process(server.process.pid).cwd() == str((tmp_path / "redis").resolve())
    finally:
        server.stop()
    assert server.process.returncode == 0
    # A clean stop saved the dump in the folder: a restart on the same data dir keeps it.
    assert {"redis.conf", "redis.log", "redis.rdb"} <= {
        p.name for p in (tmp_path / "redis").iterdir()
    }
