"""Loads the compiled library `lookfast._C` once and says which kernels it registered.

The library registers its ops with `TORCH_LIBRARY` (no pybind11), so it is loaded with `torch.ops.load_library`.
When it is missing (a source checkout that was not built, a failed build) the package still imports and every op
runs its pure-PyTorch reference; `lookfast._dispatch` warns once when that happens.
"""
from __future__ import annotations

import glob
import importlib.machinery
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

loaded: bool = False
load_error: str | None = None
library_path: str | None = None


def _find_library() -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        hits = glob.glob(os.path.join(_PACKAGE_DIR, "_C" + suffix))
        if hits:
            return hits[0]
    hits = glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd"))
    return hits[0] if hits else None


def _load() -> None:
    global loaded, load_error, library_path
    if os.environ.get("LOOKFAST_NO_EXTENSION", "") == "1":  # run as a build without the library would (tests, debugging)
        load_error = "not loaded: LOOKFAST_NO_EXTENSION=1"
        return
    path = _find_library()
    if path is None:
        load_error = f"no compiled library lookfast/_C*.so in {_PACKAGE_DIR} (build with `pip install --no-build-isolation .`)"
        return
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:  # ABI mismatch with the running torch, missing CUDA runtime, ...
        load_error = f"could not load {path}: {exc}"
        return
    loaded, library_path = True, path


_kernel_cache: dict[tuple[str, str], bool] = {}


@torch.compiler.assume_constant_result  # a constant for the process: lets torch.compile trace through the dispatch
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when the compiled library registered a kernel for `lookfast::<op>` under `dispatch_key` ("CPU", "CUDA")."""
    if not loaded:
        return False
    # Cached: the dispatcher query costs ~25 us and every op call asks; the library's kernels never change once loaded.
    key = (op, dispatch_key)
    if key not in _kernel_cache:
        try:
            _kernel_cache[key] = torch._C._dispatch_has_kernel_for_dispatch_key(f"lookfast::{op}", dispatch_key)
        except RuntimeError:  # no such op
            _kernel_cache[key] = False
    return _kernel_cache[key]


def registered_ops() -> list[str]:
    """Names of every op the compiled library defines in the `lookfast` namespace (without the namespace)."""
    if not loaded:
        return []
    # Ops named *_triton are Python `torch.library.triton_op` wrappers of the Triton launchers, not part of the
    # compiled library (they carry a CompositeExplicitAutograd kernel, not CPU/CUDA ones).
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lookfast::") and "_triton" not in n]
    return sorted(n.split("::", 1)[1] for n in names)


_load()
