"""Linear layers on weights packed once into oneDNN's blocked layout: the inference-time weight prepacking that
inductor's `freezing` does, for lookfast's eager fused model paths. Opt-in (`pack_linears`), like freezing.

Why: a bf16 `F.linear` on CPU hands oneDNN a plain row-major weight, which its matmul re-blocks on every call
(a copy of the whole weight: 4.7 MB for a ViT-B MLP layer); at LookWhere's ~280-token GEMMs that copy costs ~10%
of the layer. `torch.ops.mkldnn._reorder_linear_weight` does the blocking once, `torch.ops.mkldnn._linear_pointwise`
then runs the same kernel on it: the results are bitwise those of `F.linear` (same kernel, same accumulation order;
tests/test_packed_linear.py checks it).

Contract:
- `pack_linears(modules)` packs the weight of every given nn.Linear whose weight is bfloat16 on CPU (the dtype
  where oneDNN's bf16 kernels apply; others are left alone) when torch has oneDNN with bf16 support; it returns the
  number packed. `unpack_linears(modules)` drops the packs.
- `linear(module, x, rows=None)` is `F.linear(x, module.weight, module.bias)` (or, with `rows=slice`, the linear
  restricted to those output rows: `F.linear(x, weight[rows], bias[rows])`). It uses the pack only when one exists,
  no gradient is being recorded, x is bf16 on CPU and not an N-D non-contiguous input to a layer with a bias (there
  F.linear rounds before adding the bias; plain F.linear runs), and the weight is still the tensor that was packed:
  same data pointer and same version counter (an in-place edit through the parameter, a `load_state_dict`, an
  optimizer step or a `.to()` re-packs on the next call). NOT seen: in-place edits through `weight.data` (PyTorch
  gives `.data` a version counter of its own); after such an edit call `pack_linears` again, as after editing a
  frozen model.
- The packs live outside the modules (a weak-keyed table), so `state_dict`, `deepcopy` and pickling never see the
  opaque oneDNN tensors; a copied model starts unpacked.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pack_linears", "unpack_linears", "linear", "packing_available", "is_packed"]

# module -> {rows key: (packed weight, bias or None, the packed source (detached: shares the version counter and
# keeps the storage, hence its address, alive), source version)}
_PACKS: "weakref.WeakKeyDictionary[nn.Linear, dict]" = weakref.WeakKeyDictionary()


def packing_available() -> bool:
    """Whether this torch build can pack bf16 linear weights (oneDNN present, with bf16 kernels for this CPU)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _rows_key(rows: slice | None):
    return None if rows is None else (rows.start, rows.stop)


def _pack_entry(module: nn.Linear, rows: slice | None, batch_hint: int):
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    w, b = (weight, bias) if rows is None else (weight[rows], None if bias is None else bias[rows])
    packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_hint)
    return packed, b, weight, weight._version


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16
            and w.device.type == "cpu" and not w.is_inference())


def pack_linears(modules: Iterable[nn.Module], batch_hint: int = 256) -> int:
    """Pack every bf16 CPU nn.Linear among `modules` (e.g. `model.modules()`); returns how many were packed
    (0 where `packing_available()` is False). batch_hint: the typical number of rows per call (a layout hint only;
    any row count gives the same results). Packing again replaces the previous packs."""
    if not packing_available():
        return 0
    count = 0
    with torch.no_grad():
        for module in modules:
            if _packable(module):
                _PACKS[module] = {None: _pack_entry(module, None, batch_hint), "hint": batch_hint}
                count += 1
    return count


def unpack_linears(modules: Iterable[nn.Module]) -> None:
    """Drop the packs of `modules` (their linears then run as plain F.linear)."""
    for module in modules:
        _PACKS.pop(module, None)


def is_packed(module: nn.Module) -> bool:
    return module in _PACKS


def linear(module: nn.Linear, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """`F.linear(x, module.weight[rows], module.bias[rows])` (rows None: the whole layer), on the packed weight
    when there is a valid one (see the module docstring), else plain F.linear. Same result either way."""
    # Traced by torch.compile: plain F.linear (inductor packs weights itself under `freezing`; the table lookup and
    # the version checks are eager-only bookkeeping).
    packs = _PACKS.get(module) if _PACKS and not torch.compiler.is_compiling() else None
    # F.linear folds a contiguous (or <= 2-D) input into one GEMM with the bias in its epilogue, as the packed call
    # does; a non-contiguous N-D input with a bias it runs as matmul, then a separately rounded bias add: that case
    # stays on F.linear, to keep every result bitwise F.linear's.
    if packs is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not (
            torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)) and (
            x.dim() <= 2 or module.bias is None or x.is_contiguous()):
        weight = module.weight
        key = _rows_key(rows)
        entry = packs.get(key)
        if entry is None or entry[2].data_ptr() != weight.data_ptr() or entry[3] != weight._version:
            if not _packable(module):  # the weight changed dtype/device since it was packed
                _PACKS.pop(module, None)
                return _plain(module, x, rows)
            with torch.no_grad():
                entry = packs[key] = _pack_entry(module, rows, packs["hint"])
        return torch.ops.mkldnn._linear_pointwise(x, entry[0], entry[1], "none", [], "")
    return _plain(module, x, rows)


def _plain(module: nn.Linear, x: torch.Tensor, rows: slice | None) -> torch.Tensor:
    if rows is None:
        return F.linear(x, module.weight, module.bias)
    return F.linear(x, module.weight[rows], None if module.bias is None else module.bias[rows])
