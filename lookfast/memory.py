"""The CPU output-buffer pool of the exit kernels (csrc/cpu/row_buffer_pool.h): how much it holds, and a way to
give it back.

`exit_compact` / `compact_rows` on the CPU hand out large outputs (>= 1 MiB) from a pool of freed buffers, because
first-touch page faults on fresh memory cost more than the copy itself. Freed outputs return to the pool (up to
LOOKFAST_CPU_POOL_MB, default 256 MiB; 0 disables the pool) instead of to the OS. `cpu_pool_empty_cache()` frees
every cached buffer now, as `torch.cuda.empty_cache()` does for the CUDA caching allocator: call it after a large
job, before a memory-hungry phase. Buffers still owned by live tensors are untouched (they return to the pool, or
are freed, when the tensors die).
"""
from __future__ import annotations

import ctypes
import functools

from . import _backend

__all__ = ["cpu_pool_empty_cache", "cpu_pool_cached_bytes"]


@functools.lru_cache(maxsize=None)
def _lib():
    if not _backend.loaded or _backend.library_path is None:
        return None
    lib = ctypes.CDLL(_backend.library_path)  # the library torch already loaded: dlopen returns the same handle
    for name in ("lookfast_cpu_pool_empty_cache", "lookfast_cpu_pool_cached_bytes"):
        getattr(lib, name).restype = ctypes.c_size_t
        getattr(lib, name).argtypes = []
    return lib


def cpu_pool_empty_cache() -> int:
    """Free every buffer the CPU pool caches; returns the bytes freed (0 without the compiled library)."""
    lib = _lib()
    return int(lib.lookfast_cpu_pool_empty_cache()) if lib is not None else 0


def cpu_pool_cached_bytes() -> int:
    """Bytes the CPU pool currently caches (freed outputs kept for reuse); 0 without the compiled library."""
    lib = _lib()
    return int(lib.lookfast_cpu_pool_cached_bytes()) if lib is not None else 0
