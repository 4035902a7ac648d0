"""Linear layers on weights packed once for the CPU's matrix engine: the inference-time weight prepacking that
inductor's `freezing` does, for lookfast's eager fused model paths. Opt-in (`pack_linears`), like freezing.

Two kernels, chosen per pack (`kernel=` of `pack_linears`; "auto" takes the first available):
- "brgemm": lookfast's `packed_linear` op (csrc/cpu/packed_linear.cpp): the weight packed into the layout of oneDNN's
  brgemm micro-kernel (torch's `at::native::cpublas::brgemm`: AMX tiles or AVX512-BF16 dot products) and the layer
  run as 64 x 64 micro-kernel calls with fp32 accumulation, the bias and (when the caller passes them) a per-channel
  scale and a residual added in fp32, each output rounded ONCE to bf16. At ViT-B's ~280-row GEMMs on a Zen 5 core,
  timed alone, its micro-kernel loops ran 5-20% faster than oneDNN's matmul on its own packed weight (a whole ViT-B
  block: 10.8 against 11.2 ms), and the residual step (x + gamma * y: two more rounded passes in the official code)
  costs nothing extra. Results are not bitwise F.linear's (another summation
  order, fewer roundings): they are as close to the exact result, or closer (tests/test_packed_linear.py).
  Where: bf16 on a CPU whose micro-kernel torch has (`brgemm_available()`).
- "onednn": `torch.ops.mkldnn._reorder_linear_weight` blocks the weight once and
  `torch.ops.mkldnn._linear_pointwise` runs the same kernel F.linear does on it: bitwise F.linear's results, without
  oneDNN's per-call re-blocking of the weight (~10% of a ~280-row bf16 layer). Where: torch with oneDNN bf16
  (`packing_available()`).
- autocast packs: a float32 weight rounded once to bf16 (as autocast casts it) in oneDNN's blocked layout, used only
  under `torch.autocast("cpu", torch.bfloat16)`: bitwise autocast's own F.linear results (x and the bias cast to bf16
  per call, the output bf16; scale and residual then applied as plain torch ops, with torch's type promotion, as the
  official layers do), without autocast's per-call cast of the weight (LookWhere: ~109 M float32 linear weights
  read and rounded on every forward) and its re-blocking. Costs a bf16 copy of each packed weight (half its float32
  bytes).
  Outside autocast these layers run as plain float32 F.linear.

Contract:
- `pack_linears(modules, batch_hint, kernel="auto", autocast=True)` packs the weight of every given nn.Linear whose
  weight is bfloat16 on CPU (and, with autocast, float32 on CPU: autocast packs) and returns the number packed (0
  where no kernel is available). `unpack_linears(modules)` drops the packs.
- `linear(module, x, rows=None, *, scale=None, residual=None)` is `F.linear(x, module.weight, module.bias)` (with
  `rows=slice`, the linear restricted to those output rows), then `* scale` (a (N,) per-channel scale, e.g. a layer
  scale) and `residual +` when given. It uses the pack only when one exists, no gradient is being recorded, x is
  bf16 on CPU (autocast packs: float32 or bf16 x under bf16 CPU autocast) and (onednn) not an N-D non-contiguous
  input to a layer with a bias (there F.linear rounds before adding the bias; plain F.linear runs), and the weight is
  still the tensor that was packed: same data pointer and same
  version counter (an in-place edit through the parameter, a `load_state_dict`, an optimizer step or a `.to()`
  re-packs on the next call), and oneDNN is not switched off (`torch.backends.mkldnn.enabled`). NOT seen: in-place
  edits through `weight.data` (PyTorch gives `.data` a version counter
  of its own); after such an edit call `pack_linears` again, as after editing a frozen model. Without a pack the
  steps run as separate torch ops (each rounded), as the official code runs them.
- The packs live outside the modules (a weak-keyed table), so `state_dict`, `deepcopy` and pickling never see them;
  a copied model starts unpacked.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend

__all__ = ["pack_linears", "unpack_linears", "linear", "packing_available", "brgemm_available", "is_packed"]

KERNELS = ("auto", "brgemm", "onednn")

# module -> {rows key: (packed weight, bias or None, the packed source (detached: shares the version counter and
# keeps the storage, hence its address, alive), source version), "hint": batch_hint, "kernel": "brgemm"|"onednn"}
_PACKS: "weakref.WeakKeyDictionary[nn.Linear, dict]" = weakref.WeakKeyDictionary()


def packing_available() -> bool:
    """Whether this torch build can pack bf16 linear weights (oneDNN present, with bf16 kernels for this CPU)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Fake kernels of the library ops (torch.compile, opcheck); the ops are inference-only (no autograd: `linear` takes
# the plain path whenever a gradient is recorded).
def _fake_pack(weight):
    return weight.new_empty(weight.shape[0] * ((weight.shape[1] + 31) // 32 * 32))


def _fake_linear(x, packed_weight, out_features, bias, scale, residual):
    return x.new_empty((x.shape[0], out_features))


_backend.register("pack_linear_weight", _fake_pack)
_backend.register("packed_linear", _fake_linear)

_BRGEMM: dict[torch.dtype, bool] = {}


def brgemm_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether lookfast's compiled library is loaded and this CPU has a matrix-engine micro-kernel for `dtype` (the
    "brgemm" kernel: asked once per dtype by packing a tiny weight)."""
    if dtype not in _BRGEMM:
        ok = _backend.loaded and _backend.op_exists("pack_linear_weight")
        if ok:
            try:
                torch.ops.lookfast.pack_linear_weight(torch.zeros(1, 32, dtype=dtype))
            except RuntimeError:
                ok = False
        _BRGEMM[dtype] = ok
    return _BRGEMM[dtype]


def _rows_key(rows: slice | None):
    return None if rows is None else (rows.start, rows.stop)


def _pack_entry(module: nn.Linear, rows: slice | None, batch_hint: int, kernel: str, autocast: bool = False):
    """(packed weight, bias or None, the packed source, its version). autocast: the float32 weight rounded once to
    bf16, as autocast casts it, and no bias (cast per call, see linear)."""
    weight = module.weight.detach()
    bias = None if module.bias is None or autocast else module.bias.detach()
    w, b = (weight, bias) if rows is None else (weight[rows], None if bias is None else bias[rows])
    if autocast:
        w = w.to(torch.bfloat16)
    if kernel == "brgemm":
        packed = torch.ops.lookfast.pack_linear_weight(w)
    else:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_hint)
    return packed, b, weight, weight._version


def _packable(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and isinstance(w, torch.Tensor) and w.dtype == dtype
            and w.device.type == "cpu" and not w.is_inference())


def cpu_bf16_autocast() -> bool:
    """Whether `torch.autocast("cpu", torch.bfloat16)` is active: where autocast packs are used."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def pack_linears(modules: Iterable[nn.Module], batch_hint: int = 256, kernel: str = "auto",
                 autocast: bool = True) -> int:
    """Pack every bf16 CPU nn.Linear among `modules` (e.g. `model.modules()`) and, with `autocast`, every float32 CPU
    nn.Linear for bf16 CPU autocast (see the module docstring); returns how many were packed (0 where the kernel is
    unavailable). batch_hint: the typical number of rows per call (a layout hint for "onednn"; any row count gives
    the same results). kernel (for the bf16 weights): "auto" ("brgemm" where `brgemm_available()`, else "onednn"),
    "brgemm" or "onednn"; ValueError for another name. Packing again replaces the previous packs."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = "brgemm" if brgemm_available() else "onednn"
    if not (brgemm_available() if kernel == "brgemm" else packing_available()):
        kernel = None  # no bf16 kernel for this CPU: float32 weights may still get autocast packs (oneDNN)
    count = 0
    with torch.no_grad():
        for module in modules:
            if kernel is not None and _packable(module):
                _PACKS[module] = {None: _pack_entry(module, None, batch_hint, kernel), "hint": batch_hint,
                                  "kernel": kernel}
                count += 1
            elif autocast and _packable(module, torch.float32) and packing_available():
                _PACKS[module] = {None: _pack_entry(module, None, batch_hint, "onednn", autocast=True),
                                  "hint": batch_hint, "kernel": "onednn", "autocast": True}
                count += 1
    return count


def unpack_linears(modules: Iterable[nn.Module]) -> None:
    """Drop the packs of `modules` (their linears then run as plain F.linear)."""
    for module in modules:
        _PACKS.pop(module, None)


def is_packed(module: nn.Module) -> bool:
    return module in _PACKS


def linear(module: nn.Linear, x: torch.Tensor, rows: slice | None = None, *, scale: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """`residual + scale * F.linear(x, module.weight[rows], module.bias[rows])` (rows None: the whole layer; scale
    and residual None: skipped), on the packed weight when there is a valid one (see the module docstring), else as
    plain torch ops. scale is (N,) and residual has the output's shape, both in x's dtype (under CPU autocast with
    float32 weights: the official layer's dtypes, the linear's output bf16 and scale / residual as they come)."""
    # Traced by torch.compile: plain F.linear (inductor packs weights itself under `freezing`; the table lookup and
    # the version checks are eager-only bookkeeping). is_compiling() is asked first: dynamo never reads the weak
    # table then (a guard on its contents went stale, IndexError, once packed modules were collected).
    # With oneDNN switched off (torch.backends.mkldnn.enabled = False) both kernels step aside, as F.linear's does.
    packs = None if torch.compiler.is_compiling() or not _PACKS else _PACKS.get(module)
    if packs is None or x.device.type != "cpu" or not torch._C._get_mkldnn_enabled() or (
            torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)):
        return _plain(module, x, rows, scale, residual)
    autocast = bool(packs.get("autocast"))
    if autocast:
        # float32 weights packed as bf16 for CPU autocast: what autocast's F.linear does (x, weight and bias cast to
        # bf16, one oneDNN GEMM with the bias in its epilogue), without casting the weight again on every call.
        if not (cpu_bf16_autocast() and x.dtype in (torch.float32, torch.bfloat16)):
            return _plain(module, x, rows, scale, residual)
        x = x.to(torch.bfloat16)
    elif x.dtype != torch.bfloat16:
        return _plain(module, x, rows, scale, residual)
    brgemm = packs["kernel"] == "brgemm"
    # onednn: F.linear folds a contiguous (or <= 2-D) input into one GEMM with the bias in its epilogue, as the
    # packed call does; a non-contiguous N-D input with a bias it runs as matmul, then a separately rounded bias
    # add: that case stays on F.linear, to keep every result bitwise F.linear's.
    if not (brgemm or x.dim() <= 2 or module.bias is None or x.is_contiguous()):
        return _plain(module, x, rows, scale, residual)
    entry = _current_entry(module, packs, rows)
    if entry is None:
        return _plain(module, x, rows, scale, residual)
    if brgemm:
        n = entry[2].shape[0] if rows is None else len(range(*rows.indices(entry[2].shape[0])))
        x2 = x.reshape(-1, x.shape[-1])
        res2 = None if residual is None else residual.reshape(-1, n)
        out = torch.ops.lookfast.packed_linear(x2, entry[0], n, entry[1], scale, res2)
        return out.view(*x.shape[:-1], n)
    bias = entry[1]
    if autocast and module.bias is not None:  # per call: (N,), and an edited bias is seen
        bias = (module.bias if rows is None else module.bias[rows]).to(torch.bfloat16)
    out = torch.ops.mkldnn._linear_pointwise(x, entry[0], bias, "none", [], "")
    return _epilogue(out, scale, residual)


def _current_entry(module: nn.Linear, packs: dict, rows: slice | None):
    """The pack of `rows` of module's weight, re-made when the weight was replaced or edited since it was packed; None
    (and the module's packs dropped) when the weight no longer fits the pack's kind (its dtype or device changed)."""
    weight = module.weight
    key = _rows_key(rows)
    entry = packs.get(key)
    if entry is None or entry[2].data_ptr() != weight.data_ptr() or entry[3] != weight._version:
        autocast = bool(packs.get("autocast"))
        if not _packable(module, torch.float32 if autocast else torch.bfloat16):
            _PACKS.pop(module, None)
            return None
        with torch.no_grad():
            entry = packs[key] = _pack_entry(module, rows, packs["hint"], packs["kernel"], autocast)
    return entry


def _epilogue(y: torch.Tensor, scale: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    if scale is not None:
        y = y * scale
    return y if residual is None else residual + y


def _plain(module: nn.Linear, x: torch.Tensor, rows: slice | None, scale=None, residual=None) -> torch.Tensor:
    if rows is None:
        y = F.linear(x, module.weight, module.bias)
    else:
        y = F.linear(x, module.weight[rows], None if module.bias is None else module.bias[rows])
    return _epilogue(y, scale, residual)
