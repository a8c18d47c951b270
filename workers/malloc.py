"""How a worker process's memory allocators are set: memory freed by one batch is reused by
the next, and Arrow's allocator takes no transparent huge pages.

glibc returns memory eagerly: a block above its mmap threshold is mapped on its own and
unmapped when freed, and free space at the top of the heap beyond the trim threshold (twice
the mmap threshold, which adapts to the largest mapped block freed so far, a few MiB here)
goes back with brk. A forward pass frees several MiB of activations every batch (4096 rows by
256 floats is 4 MiB), so the heap shrank and grew batch after batch and its pages were faulted
in anew each time. Fixed thresholds end it: blocks up to 32 MiB come from the heap, and its top
is trimmed only past 128 MiB free, so what one batch (or job) frees the next one reuses.

Arrow's allocator (mimalloc) asks for transparent huge pages for its 1 GiB arena, and a
fresh process faults them in as Parquet pages are read. On the 2-core VM we measure on, a
2 MiB fault often cost milliseconds (most likely the host backing the page), so a fresh
worker's first batch job ran 20% slower than with 4 KiB pages; later jobs were no faster
with huge pages.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 128 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def configure() -> None:
    """Set this process's allocators, for itself and the processes it forks or starts. Call
    it before pyarrow is imported: mimalloc reads its options when Arrow's library loads."""
    os.environ.setdefault("MIMALLOC_ALLOW_THP", "0")
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process and the ones it forks; False
    where the C library is not glibc (macOS, musl), which manage memory their own way."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):  # the name is unknown off glibc
        return False
    if not libc.startswith("glibc"):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
