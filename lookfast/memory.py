"""The CPU output-buffer pool of the exit kernels (csrc/cpu/row_buffer_pool.h): how much it holds, and a way to
give it back.

`exit_compact` / `compact_rows` on the CPU hand out large outputs (>= 1 MiB) from a pool of freed buffers, because
first-touch page faults on fresh memory cost more than the copy itself. Freed outputs return to the pool (up to
LOOKFAST_CPU_POOL_MB, default 256 MiB; 0 disables the pool) instead of to the OS. `cpu_pool_empty_cache()` frees
every cached buffer now, as `torch.cuda.empty_cache()` does for the CUDA caching allocator: call it after a large
job, before a memory-hungry phase. Buffers still owned by live tensors are untouched (they return to the pool, or
are freed, when the tensors die).

`keep_freed_cpu_memory()` does the same for every CPU tensor, through the C library's allocator: torch's CPU tensors
come from glibc malloc, which by default hands large freed blocks back to the OS, so the next batch's activations
page-fault in again (on the project's VMs a Dyn-Perceiver B 64 bf16 forward took ~10k faults per call, 40 MB, and
an early-exit call ~21k, at 1-2 us each). lookfast's serving and batch-inference processes (`python -m lookfast
serve|infer`, the Ray workers) call it at start, the bench with `--keep-freed-memory`; a program that embeds lookfast
can call it once too.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

from . import _backend

__all__ = ["cpu_pool_empty_cache", "cpu_pool_cached_bytes", "keep_freed_cpu_memory"]


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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_cpu_memory(limit_mb: int = 1024) -> bool:
    """Keep freed CPU memory in the process for reuse, instead of returning it to the OS (glibc only).

    Sets glibc's malloc so that blocks up to `limit_mb` MiB come from its heap rather than from fresh mmaps, and so
    that up to `limit_mb` MiB of free heap is kept rather than trimmed: steady-state inference then reuses warm pages
    instead of page-faulting fresh ones for every large activation. The cost is that the process keeps its peak heap
    (up to `limit_mb` MiB of it free), as a caching allocator does, and a heap can fragment: a Dyn-Perceiver B 64 bf16
    early-exit loop peaked at 597 MB instead of 578 MB with ~10-25k fewer page faults per call, while a loop of two
    fresh 96 MB tensors per round settled at ~1 GB after five rounds. Process-wide and lasting; call once, before
    the work. Environment: LOOKFAST_KEEP_FREED_MEMORY=0 turns it into a no-op (returns False).

    Args:
        limit_mb: int in 1..2047 (glibc takes the thresholds as C ints of bytes).

    Returns:
        True when applied; False on a C library without glibc's mallopt (musl, macOS, Windows) or when disabled.

    Raises:
        TypeError / ValueError for a `limit_mb` that is not an int in 1..2047.
    """
    if isinstance(limit_mb, bool) or not isinstance(limit_mb, int):
        raise TypeError(f"limit_mb must be an int (MiB), got {type(limit_mb).__name__}")
    if not 1 <= limit_mb <= 2047:
        raise ValueError(f"limit_mb must be in 1..2047 (MiB; glibc's thresholds are C ints of bytes), got {limit_mb}")
    if os.environ.get("LOOKFAST_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt (if any) take other parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = limit_mb << 20
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
