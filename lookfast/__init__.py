"""lookfast: kernels for sparse token compute in efficient vision models.

Public ops (each validates its inputs and dispatches to the compiled library, Triton or the reference, see
`lookfast._backend`): see `lookfast.ops` and the README. Importing lookfast never imports triton. Models live in
`lookfast.models`.
"""
from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys


def _alias_source_kernels() -> None:
    # An installed wheel maps kernels/ to lookfast.kernels (setup.py). A source checkout keeps them in ../kernels;
    # alias them so `import lookfast.kernels` works the same in both.
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")) or "lookfast.kernels" in _sys.modules:
        return
    src = _os.path.join(here, _os.pardir, "kernels")
    init = _os.path.join(src, "__init__.py")
    if _os.path.isfile(init):
        spec = _ilu.spec_from_file_location("lookfast.kernels", init, submodule_search_locations=[src])
        module = _ilu.module_from_spec(spec)
        _sys.modules["lookfast.kernels"] = module
        spec.loader.exec_module(module)


_alias_source_kernels()

from . import _backend  # noqa: E402  (loads the compiled library before the ops register fake kernels and autograd)
from .ops.topk_patch_gather import topk_indices, topk_patch_gather  # noqa: E402
from .ops.varlen_attention import cross_attention, varlen_attention  # noqa: E402
from .ops.nearest_patch_fill import nearest_patch_fill  # noqa: E402
from .ops.layer_norm_rows import layer_norm_rows  # noqa: E402
from .early_exit import (  # noqa: E402
    EarlyExitRunner,
    budget_proportions,
    calibrate_thresholds,
    exit_compact,
    exit_scatter,
    expected_cost,
)
from .memory import cpu_pool_cached_bytes, cpu_pool_empty_cache, keep_freed_cpu_memory  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "topk_indices",
    "topk_patch_gather",
    "varlen_attention",
    "cross_attention",
    "nearest_patch_fill",
    "layer_norm_rows",
    "exit_compact",
    "exit_scatter",
    "EarlyExitRunner",
    "calibrate_thresholds",
    "budget_proportions",
    "expected_cost",
    "cpu_pool_empty_cache",
    "cpu_pool_cached_bytes",
    "keep_freed_cpu_memory",
]
