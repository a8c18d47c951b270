"""Check an uploaded dataset in a child process, so no file can crash the web.

pyarrow and numpy are C++ and C: a crafted file can make them crash (pyarrow's JSON reader
segfaults on a value nested ~20,000 deep), allocate without bound or spin. The web never
runs them on an upload itself: `inspect_isolated` runs kiln.datasets.inspect in a fresh
interpreter with an address-space and CPU-time limit and a wall-clock timeout, and turns
a crash, a limit or a timeout into UnsupportedDataset (422) for that file only.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from kiln.datasets import DatasetInfo, inspect
from kiln.errors import UnsupportedDataset

log = logging.getLogger(__name__)

#: Address space of the child: inspect streams, so this is far above what a valid file of
#: the largest allowed upload needs, and far below what would starve the web's machine.
PROBE_MEMORY_BYTES = 3 * 1024**3
#: Reading the largest allowed upload takes well under a minute.
PROBE_TIMEOUT_S = 300
_USER_ERROR, _OUT_OF_MEMORY, _UNREADABLE = 3, 4, 5
#: One thread per math library: the child is one of many on the web's machine.
_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def inspect_isolated(
    path: Path,
    fmt: str,
    *,
    memory_bytes: int = PROBE_MEMORY_BYTES,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> DatasetInfo:
    """kiln.datasets.inspect(path, fmt), run in a child process under limits."""
    command = _command(path, fmt, memory_bytes, timeout_s)
    try:
        done = subprocess.run(  # fixed argv: this interpreter and module
            command,
            capture_output=True,
            timeout=timeout_s,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UnsupportedDataset(
            f"the file could not be read: reading it took longer than {timeout_s:g} s"
        ) from None
    code = done.returncode
    if code == 0:
        return DatasetInfo(**json.loads(done.stdout))
    if code in (_USER_ERROR, _OUT_OF_MEMORY, _UNREADABLE):
        raise UnsupportedDataset(json.loads(done.stdout)["error"])
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        log.warning("dataset probe: the %s reader was killed by %s", fmt, name)
        raise UnsupportedDataset(
            f"the file could not be read: the {fmt.upper()} reader crashed on it ({name})"
        )
    # The child failed before reading the file (an import error): the server's fault.
    tail = done.stderr.decode("utf-8", "replace")[-2000:]
    raise RuntimeError(f"the dataset probe failed with exit status {code}: {tail}")


def _child_env() -> dict[str, str]:
    # The child imports this very kiln, installed or not (a checkout run in place).
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return os.environ | _ENV | {"PYTHONPATH": path}


def _command(path: Path, fmt: str, memory_bytes: int, timeout_s: float) -> list[str]:
    limits = [str(memory_bytes), str(int(timeout_s) + 1)]
    return [sys.executable, "-m", "kiln.dataset_probe", str(path), fmt, *limits]


def main(argv: list[str]) -> int:
    """The child: limit itself before reading the file, inspect it, answer on stdout."""
    path, fmt, memory_bytes, cpu_s = argv[0], argv[1], int(argv[2]), int(argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    try:
        info = inspect(Path(path), fmt)
    except UnsupportedDataset as exc:
        return _answer({"error": exc.message}, _USER_ERROR)
    except MemoryError:
        message = f"the file could not be read within {memory_bytes // 1024**2} MiB of memory"
        return _answer({"error": message}, _OUT_OF_MEMORY)
    except Exception as exc:  # anything else a crafted file provokes is about the file
        return _answer({"error": f"the file could not be read ({type(exc).__name__})"}, _UNREADABLE)
    return _answer({"format": info.format, "rows": info.rows, "columns": info.columns}, 0)


def _answer(body: dict[str, Any], status: int) -> int:
    sys.stdout.write(json.dumps(body))
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
