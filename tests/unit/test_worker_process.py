"""How a worker process keeps its memory: freed memory is reused by the next batch, not
returned to the kernel and faulted in again page by page; Arrow's allocator asks for no
transparent huge pages; and a pool process hides its start-up objects from the cyclic
garbage collector. Each probe runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# In a fresh interpreter: ten "batches" that each allocate, touch and free the blocks of a
# forward pass (a 2 MiB chunk of features, two 4 MiB activations, 160 KiB of outputs);
# prints the page faults they caused after a first batch had warmed the heap.
_BATCH_PROBE = """
import ctypes, resource, sys
from workers import malloc
if sys.argv[1] == "tuned":
    assert malloc.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZES = (2 << 20, 4 << 20, 4 << 20, 160 << 10)

def batch():
    blocks = [libc.malloc(size) for size in SIZES]
    for block, size in zip(blocks, SIZES):
        ctypes.memset(block, 1, size)
    for block in reversed(blocks):
        libc.free(block)

batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run_probe(probe: str, mode: str = "") -> list[int]:
    """Run `probe` in a fresh interpreter from the repository root; the numbers it prints."""
    done = subprocess.run(
        [sys.executable, "-c", probe, mode],
        cwd=Path(__file__).parents[2],
        env={**os.environ, "KILN_REDIS_URL": "redis://127.0.0.1:1"},  # the worker app's broker
        capture_output=True,
        text=True,
        check=True,
    )
    return [int(word) for word in done.stdout.split()]


@glibc_only
def test_a_tuned_process_reuses_freed_batch_memory_without_page_faults() -> None:
    [default], [tuned] = _run_probe(_BATCH_PROBE, "default"), _run_probe(_BATCH_PROBE, "tuned")
    assert default > 10 * 1000  # glibc's own thresholds: each batch faults its 10 MiB in again
    assert tuned < 100


# Prints how many mappings are advised for transparent huge pages (VmFlags "hg") once Arrow
# has allocated.
_ARROW_PROBE = """
import sys
from workers import malloc
if sys.argv[1] == "tuned":
    malloc.configure()
import pyarrow as pa
buffer = pa.allocate_buffer(8 << 20)
print(sum(line.startswith("VmFlags") and " hg" in line for line in open("/proc/self/smaps")))
"""


@glibc_only
def test_arrow_takes_no_huge_pages_in_a_configured_process() -> None:
    assert _run_probe(_ARROW_PROBE, "tuned") == [0]
    if _run_probe(_ARROW_PROBE, "default") == [0]:
        pytest.skip("this pyarrow's allocator does not ask for huge pages anyway")


# Loads the worker app, starts a pool process's life as Celery does (the
# worker_process_init signal), then counts what a full collection still walks.
_FREEZE_PROBE = """
import gc
from celery import signals
import workers.main
before = gc.get_freeze_count()
signals.worker_process_init.send(sender=None)
gc.collect()
print(before, gc.get_freeze_count(), len(gc.get_objects()))
"""


def test_a_pool_process_freezes_its_start_up_objects() -> None:
    before, frozen, left = _run_probe(_FREEZE_PROBE)
    assert before == 0
    assert frozen > 100_000  # torch, SQLAlchemy, Celery and the app
    assert left < frozen / 10  # what a full collection still walks
