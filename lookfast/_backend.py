"""Which implementation of an op runs: the compiled library, Triton or the pure-PyTorch reference.

One module for the three op families:

- Loading. The compiled library `lookfast._C` registers its ops with `TORCH_LIBRARY` (no pybind11) and is loaded
  once, here, with `torch.ops.load_library`. When it is missing (a source checkout that was not built, a failed build)
  the package still imports and every op runs its reference, with a warning (a silent fallback could hide a large
  slowdown).
- Registration. The library defines `lookfast::<op>` and its CPU/CUDA kernels; each `lookfast/ops/<family>.py` adds
  the fake kernels and autograd with `register`. The Triton backend of a family is a set of ops named
  `lookfast::<op>_triton`, defined by `lookfast.kernels.<family>` (ending like each C++ file ends with its
  `TORCH_LIBRARY_IMPL`) and imported only when Triton first runs (`load_triton`), so CPU users never import triton.
- Choice (`backend_for`), made per op and device:
  - `LOOKFAST_BACKEND=reference` forces the reference everywhere (to compare or debug).
  - CPU tensors: the library (its CPU kernel) when compiled, else the reference.
  - CUDA tensors: `LOOKFAST_GPU_BACKEND=cuda|triton` picks the preference; by default the library's CUDA kernel when
    one was compiled, else Triton, else the reference. When the preferred one is missing the other runs, and a
    warning says why.
  The library choice is one call, `torch.ops.lookfast.<op>`: torch's dispatcher routes it to the CPU or CUDA kernel.
- Calling: `call` runs the chosen implementation; every public function goes through it.
"""
from __future__ import annotations

import glob
import importlib
import importlib.machinery
import os
import warnings
from typing import Callable

import torch

LIBRARY, TRITON, REFERENCE = "library", "triton", "reference"

# The library ops of each family (csrc/lookfast.cpp). A family's Triton ops live in lookfast.kernels.<family>.
FAMILIES = {
    "topk_patch_gather": ("topk_indices", "patch_gather_embed", "patch_gather_embed_backward"),
    "varlen_attention": ("varlen_attention_fwd", "varlen_attention_bwd"),
    "exit_compact": ("exit_confidence_mask", "compact_rows", "compact_rows_backward", "exit_scatter"),
    "nearest_patch_fill": ("nearest_patch_fill",),
    "layer_norm_rows": ("layer_norm_rows",),
    "packed_linear": ("pack_linear_weight", "packed_linear"),
    "group_conv3x3": ("group_conv3x3",),
}
# Library ops with a CPU kernel only: on a GPU their reference (a few batched torch ops, GPU-friendly) runs, with no
# warning and no Triton lookup; check_cuda_build does not ask them for a CUDA kernel.
CPU_ONLY = frozenset({"nearest_patch_fill", "layer_norm_rows", "pack_linear_weight", "packed_linear",
                      "group_conv3x3"})
# CPU-only families with no public function: the fused models call them on CPUs that have the kernels' matrix
# features and run torch's own ops elsewhere (docs/ops.md section 6).
MODEL_INTERNAL = frozenset({"packed_linear", "group_conv3x3"})
_FAMILY_OF = {op: family for family, ops in FAMILIES.items() for op in ops}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

loaded: bool = False
load_error: str | None = None
library_path: str | None = None


# ------------------------------------------------------------------------------------------------ loading the library
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


# ------------------------------------------------------------------------------------------------- what is registered
def op_exists(op: str) -> bool:
    """True when `lookfast::<op>` is defined (by the loaded library, or by a Triton module already imported)."""
    try:
        getattr(torch.ops.lookfast, op)
    except (AttributeError, RuntimeError):
        return False
    return True


def _constant_under_compile(fn):
    """`torch.compiler.assume_constant_result`, without its import of torch._dynamo (which imports triton, and
    importing lookfast must not). The mark is what that decorator sets; tests/test_extension.py checks it still is."""
    fn._dynamo_marked_constant = True
    return fn


_kernel_cache: dict[tuple[str, str], bool] = {}


@_constant_under_compile  # a constant for the process: lets torch.compile trace through the dispatch
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
    # Ops named *_triton are the Triton backend (Python custom ops), not part of the compiled library.
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lookfast::") and not n.endswith("_triton")]
    return sorted(n.split("::", 1)[1] for n in names)


def register(op: str, fake: Callable, backward: Callable | None = None, setup_context: Callable | None = None) -> bool:
    """Register the fake kernel (and autograd, when `backward` is given) of `lookfast::<op>`, if the op exists.

    The one registration step of every op, library or Triton: returns False (and does nothing) when the op is not
    defined, e.g. the library did not load; the public functions then never call it."""
    if not op_exists(op):
        return False
    torch.library.register_fake(f"lookfast::{op}")(fake)
    if backward is not None:
        torch.library.register_autograd(f"lookfast::{op}", backward, setup_context=setup_context)
    return True


# ------------------------------------------------------------------------------------------------------------ Triton
_triton_state: dict[str, bool] = {}


def triton_available() -> bool:
    """True when triton imports. Asked only for GPU tensors (and by `python -m lookfast info`): CPU runs never import it."""
    if "importable" not in _triton_state:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_state["importable"] = False
        else:
            _triton_state["importable"] = True
    return _triton_state["importable"]


def load_triton(op: str) -> None:
    """Import `lookfast.kernels.<family of op>`, which defines the family's `lookfast::<op>_triton` ops (once)."""
    family = _FAMILY_OF.get(op, op)
    if family not in _triton_state:
        importlib.import_module(f"lookfast.kernels.{family}")
        _triton_state[family] = True


# ------------------------------------------------------------------------------------------------------------ choice
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a RuntimeWarning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_forced: str | None = None  # set by the tests (`forced`) to run one public-API body on each backend


class forced:
    """Context manager (for tests): every op runs `backend` ("library", "triton" or "reference") whatever the device.

    "triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton was imported."""

    def __init__(self, backend: str):
        if backend not in (LIBRARY, TRITON, REFERENCE):
            raise ValueError(f"backend must be {LIBRARY!r}, {TRITON!r} or {REFERENCE!r}, got {backend!r}")
        self.backend, self.previous = backend, None

    def __enter__(self):
        global _forced
        self.previous, _forced = _forced, self.backend
        return self

    def __exit__(self, *exc):
        global _forced
        _forced = self.previous


# torch.compile evaluates the choice once, while tracing, and bakes it into the graph (the library queries inside
# cannot be traced); changing LOOKFAST_BACKEND later affects eager calls and new compilations only.
@_constant_under_compile
def backend_for(op: str, device: torch.device) -> str:
    """The backend that runs `lookfast::<op>` for tensors on `device`: "library", "triton" or "reference"."""
    forced_env = os.environ.get("LOOKFAST_BACKEND", "").strip().lower()
    if forced_env not in (REFERENCE, "auto", ""):
        raise ValueError(f"LOOKFAST_BACKEND must be 'reference' or unset, got {forced_env!r}")
    if forced_env == REFERENCE:
        return REFERENCE
    if _forced is not None:
        if _forced == TRITON:
            load_triton(op)
        return _forced
    if device.type == "cpu":
        if has_kernel(op, "CPU"):
            return LIBRARY
        warn_once(f"cpu:{op}", f"lookfast: no compiled CPU kernel for {op} ({load_error or 'op not in the library'}); "
                               "running the pure-PyTorch reference, which can be much slower")
        return REFERENCE
    if device.type == "cuda":
        return REFERENCE if op in CPU_ONLY else _gpu_backend(op)
    warn_once(f"{device.type}:{op}", f"lookfast: no kernel for device type {device.type!r}; using the reference")
    return REFERENCE


def _gpu_backend(op: str) -> str:
    choice = os.environ.get("LOOKFAST_GPU_BACKEND", "").strip().lower()
    if choice not in ("", "cuda", TRITON):
        raise ValueError(f"LOOKFAST_GPU_BACKEND must be 'cuda' or 'triton', got {choice!r}")
    has_cuda = has_kernel(op, "CUDA")
    if choice in ("", "cuda") and has_cuda:
        return LIBRARY
    if triton_available():
        if choice == "cuda":
            warn_once(f"cuda-missing:{op}", f"lookfast: LOOKFAST_GPU_BACKEND=cuda but no CUDA kernel was compiled "
                                            f"for {op} ({load_error or 'op not in the library'}); using Triton")
        load_triton(op)
        return TRITON
    if has_cuda:  # LOOKFAST_GPU_BACKEND=triton without triton: the compiled kernel still beats the reference
        warn_once(f"triton-missing:{op}", f"lookfast: LOOKFAST_GPU_BACKEND=triton but triton is not installed; "
                                          f"running the compiled CUDA kernel for {op}")
        return LIBRARY
    warn_once(f"gpu:{op}", f"lookfast: no compiled CUDA kernel for {op} ({load_error or 'op not in the library'}) "
                           "and triton is not installed; running the pure-PyTorch reference, which is much slower")
    return REFERENCE


# ----------------------------------------------------------------------------------------------------------- calling
last_backend: dict[str, str] = {}  # op -> the backend of its latest eager call (what tests read to know what ran)


def call(op: str, device: torch.device, reference: Callable, *args):
    """Run `lookfast::<op>` (library), `lookfast::<op>_triton` or `reference` on `args`, as `backend_for` chooses."""
    backend = backend_for(op, device)  # a compile-time constant under torch.compile
    if not torch.compiler.is_compiling():
        last_backend[op] = backend
    if backend == LIBRARY:
        return getattr(torch.ops.lookfast, op)(*args)
    if backend == TRITON:
        return getattr(torch.ops.lookfast, op + "_triton")(*args)
    return reference(*args)


_load()
