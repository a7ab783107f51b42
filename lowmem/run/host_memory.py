"""Host memory that follows what training holds: freed activation buffers go back to the operating system.

glibc serves an allocation from its heap unless it is larger than the mmap threshold, and it raises that threshold
(up to 32 MiB) each time a larger block is freed. Activations of a long sequence are 1-32 MiB tensors allocated
and freed every layer, so after the first few frees they all come from the heap, whose freed space is kept and
fragments: a LoRA step at 8192 tokens peaked at 2.65 GiB of host memory on 6 layers where 1.32 GiB is live
(bench/RESULTS.md, "Long sequences on one device"). A fixed threshold keeps every tensor of 1 MiB or more in its
own mapping, returned on free; zeroing fresh pages costs less than the heap's fragmentation did (a 2048-token
LoRA step of a 135M model: 32 s instead of 35 s, peak 1.36 GiB instead of 1.57).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)
def return_freed_tensors_to_the_os() -> bool:
    """Fix glibc's mmap threshold for this process (once); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    except OSError:
        return False
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
