"""Chooses which implementation of an op runs, as OPS.md prescribes.

- `LOOKFAST_BACKEND=reference` forces the pure-PyTorch reference everywhere (useful to compare or debug).
- CPU tensors: the compiled C++ kernel when the extension is loaded, else the reference with a one-time warning
  (a silent fallback could hide a large slowdown).
- CUDA tensors: `LOOKFAST_GPU_BACKEND=cuda|triton`; by default the CUDA C++ kernel when one was compiled for the op,
  else Triton, else the reference (warned once).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _ext

REFERENCE, CPP, CUDA, TRITON = "reference", "cpp", "cuda", "triton"
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a RuntimeWarning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# torch.compile evaluates the choice once, while tracing, and bakes it into the graph (the library queries inside
# cannot be traced); changing LOOKFAST_BACKEND later affects eager calls and new compilations only.
@torch.compiler.assume_constant_result
def backend_for(op: str, device: torch.device) -> str:
    """The backend that runs `lookfast::<op>` for tensors on `device`: "reference", "cpp", "cuda" or "triton"."""
    forced = os.environ.get("LOOKFAST_BACKEND", "").strip().lower()
    if forced == REFERENCE:
        return REFERENCE
    if forced and forced not in (REFERENCE, "auto", ""):
        raise ValueError(f"LOOKFAST_BACKEND must be 'reference' or unset, got {forced!r}")
    if device.type == "cpu":
        if _ext.has_kernel(op, "CPU"):
            return CPP
        warn_once(
            f"cpu:{op}",
            f"lookfast: no compiled CPU kernel for {op} ({_ext.load_error or 'op not in the library'}); "
            "running the pure-PyTorch reference, which can be much slower",
        )
        return REFERENCE
    if device.type == "cuda":
        choice = os.environ.get("LOOKFAST_GPU_BACKEND", "").strip().lower()
        if choice not in ("", CUDA, TRITON):
            raise ValueError(f"LOOKFAST_GPU_BACKEND must be 'cuda' or 'triton', got {choice!r}")
        has_cuda, has_triton = _ext.has_kernel(op, "CUDA"), triton_available()
        if choice == CUDA and has_cuda or choice == "" and has_cuda:
            return CUDA
        if choice in (TRITON, "") and has_triton:
            return TRITON
        if choice == CUDA and has_triton:
            warn_once(f"cuda-missing:{op}", f"lookfast: no CUDA kernel compiled for {op}; using Triton")
            return TRITON
        warn_once(f"gpu:{op}", f"lookfast: neither a CUDA kernel nor Triton is available for {op}; using the reference")
        return REFERENCE
    warn_once(f"{device.type}:{op}", f"lookfast: no kernel for device type {device.type!r}; using the reference")
    return REFERENCE
