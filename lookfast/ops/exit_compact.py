"""Exit-masked batched execution: `exit_compact` (who leaves at an exit, and the survivors' states compacted in one
pass) and `exit_scatter` (rows written back to their batch positions). Contract: docs/ops.md section 3.

Backends (lookfast._backend): the library ops `lookfast::exit_confidence_mask` + `lookfast::compact_rows`,
`lookfast::exit_scatter` (C++ on CPU, CUDA kernels on GPUs), their Triton twins `lookfast::<op>_triton` (defined by
`lookfast.kernels.exit_compact` the first time Triton runs), and the pure-PyTorch reference
(`exit_compact_reference`). On a GPU each `exit_compact` call synchronises with the host exactly once, to read the
number of exits that sizes the outputs (their shapes are (m, ...) by contract); the confidences, flags, prefix sums
and row copies stay on the device. Under torch.compile the sizes are unbacked symbolic sizes
(`new_dynamic_size`); set `torch._dynamo.config.capture_dynamic_output_shape_ops = True` for `fullgraph=True`.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .. import _backend
from .._validate import FLOAT_DTYPES, require_dim, require_dtype, require_same_device, require_tensor

CRITERIA = {"max_softmax": 0, "entropy": 1, "margin": 2}
_CRITERION_NAMES = {code: name for name, code in CRITERIA.items()}


# ----------------------------------------------------------------------------------------------------- reference
def exit_confidence_reference(logits: torch.Tensor, criterion: str = "max_softmax") -> torch.Tensor:
    """Confidence per row of `logits` (n, C): in float32 for half types and float32, float64 for float64.

    max_softmax: the largest softmax probability; entropy: -sum p log p (0 log 0 = 0); margin: top1 - top2
    probability (p2 = 0 with one class). A row holding NaN or +inf, or only -inf, has NaN confidence.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    p = torch.softmax(x, dim=-1)
    if criterion == "entropy":
        plogp = torch.where(p > 0, p * torch.log_softmax(x, dim=-1), p * 0)  # p * 0 keeps NaN visible
        return -plogp.sum(-1)
    if criterion == "margin":
        if x.shape[-1] == 1:
            return p[:, 0]
        top = torch.topk(p, 2, dim=-1).values
        return top[:, 0] - top[:, 1]
    return p.amax(-1)


def exit_mask_reference(logits: torch.Tensor, threshold, criterion: str = "max_softmax") -> torch.Tensor:
    """(n,) bool: True where the row leaves. The threshold is rounded to the confidence's dtype; NaN never exits."""
    conf = exit_confidence_reference(logits, criterion)
    thr = torch.as_tensor(threshold, dtype=conf.dtype, device=conf.device).reshape(())
    return conf <= thr if criterion == "entropy" else conf >= thr


def exit_compact_reference(logits, threshold, *states, criterion="max_softmax"):
    """Pure-PyTorch `exit_compact`: (keep, exited, *states[keep])."""
    keep, exited = _exit_confidence_mask_reference(logits, threshold, CRITERIA[criterion])
    return (keep, exited, *_compact_rows_reference(states, keep))


def _exit_confidence_mask_reference(logits, threshold, criterion: int):
    """The reference with the library op's arguments: (keep, exited) int64 positions."""
    exits = exit_mask_reference(logits, threshold, _CRITERION_NAMES[criterion])
    return torch.nonzero(~exits).squeeze(1), torch.nonzero(exits).squeeze(1)


def rows_are_contiguous(t: torch.Tensor) -> bool:
    """True when each row t[i] is contiguous (any stride between rows)."""
    expected = 1
    for d in range(t.dim() - 1, 0, -1):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def compacted_strides(state: torch.Tensor):
    """The strides of compact_rows' output for `state` (None: contiguous). A state whose rows are each one dense
    block in another dimension order (a channels_last image batch, say) keeps its strides within a row, rows back to
    back, so the next layer gets the layout it had; any other state comes back contiguous. The C++/CUDA kernels use
    the same rule (csrc/common/exit_checks.h, compacted_strides)."""
    if state.dim() < 2 or rows_are_contiguous(state):
        return None
    dims = sorted((d for d in range(1, state.dim()) if state.shape[d] != 1), key=lambda d: state.stride(d))
    expected = 1
    for d in dims:
        if state.stride(d) != expected:  # a gap or an overlap within the row
            return None
        expected *= state.shape[d]
    return (expected, *state.stride()[1:])


def compacted_empty(state: torch.Tensor, rows) -> torch.Tensor:
    """An uninitialised (rows, *state.shape[1:]) tensor laid out as `compacted_strides(state)` says."""
    shape = (rows, *state.shape[1:])
    strides = compacted_strides(state)
    return state.new_empty(shape) if strides is None else state.new_empty_strided(shape, strides)


def _compact_rows_reference(states, keep):
    return [torch.index_select(s, 0, keep, out=compacted_empty(s, keep.shape[0])) for s in states]


def exit_scatter_reference(out, batch_index, values):
    """Pure-PyTorch `exit_scatter`: out[batch_index] = values, in place (autograd-aware)."""
    return out.index_copy_(0, batch_index, values)


# ------------------------------------------------------------------------------------- fake kernels and autograd
def _exit_confidence_mask_fake(logits, threshold, criterion):
    n = logits.shape[0]
    ctx = torch.library.get_ctx()
    survivors = ctx.new_dynamic_size(min=0, max=n) if isinstance(n, int) else ctx.new_dynamic_size()
    torch._check(survivors <= n)
    keep = logits.new_empty((survivors,), dtype=torch.int64)
    exited = logits.new_empty((n - survivors,), dtype=torch.int64)
    return keep, exited


def _compact_rows_fake(states, keep):
    return [compacted_empty(s, keep.shape[0]) for s in states]


def _compact_rows_backward_fake(grads, keep, rows):
    return [g.new_empty((rows, *g.shape[1:])) for g in grads]


def _exit_scatter_fake(out, batch_index, values):
    return None


def _compact_setup_context(ctx, inputs, output):
    states, keep = inputs
    ctx.save_for_backward(keep)
    ctx.rows = states[0].shape[0] if len(states) else 0
    ctx.differentiable = [s.dtype.is_floating_point or s.dtype.is_complex for s in states]


def _compact_backward(ctx, grads):
    (keep,) = ctx.saved_tensors
    wanted = [i for i, g in enumerate(grads) if g is not None and ctx.differentiable[i]]
    result = [None] * len(grads)
    if wanted:
        picked = [grads[i] for i in wanted]
        if _backend.has_kernel("compact_rows_backward", keep.device.type.upper()):
            computed = torch.ops.lookfast.compact_rows_backward(picked, keep, ctx.rows)
        else:  # a Triton-only install (no compiled CUDA kernels): the same adjoint in plain PyTorch
            computed = [g.new_zeros((ctx.rows, *g.shape[1:])).index_add_(0, keep, g) for g in picked]
        for i, g in zip(wanted, computed):
            result[i] = g
    return result, None


def register_backend(suffix: str) -> None:
    """Fake kernels and autograd of this family's ops named `<library op><suffix>`: "" for the compiled library (done
    here, at import), "_triton" for the Triton ops (by lookfast.kernels.exit_compact). The Triton family has no
    `compact_rows_backward`: its gradient is the PyTorch adjoint in `_compact_backward`."""
    _backend.register(f"exit_confidence_mask{suffix}", _exit_confidence_mask_fake)
    _backend.register(f"compact_rows{suffix}", _compact_rows_fake, _compact_backward, _compact_setup_context)
    _backend.register(f"compact_rows_backward{suffix}", _compact_rows_backward_fake)
    _backend.register(f"exit_scatter{suffix}", _exit_scatter_fake)


register_backend("")


# ----------------------------------------------------------------------------------------------------- validation
def criterion_code(criterion) -> int:
    """The integer code of a criterion name ("max_softmax" 0, "entropy" 1, "margin" 2); ValueError otherwise."""
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
    return CRITERIA[criterion]


def _threshold_tensor(threshold, logits: torch.Tensor) -> torch.Tensor:
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() != 0:
            raise ValueError(f"threshold must be a Python float or a 0-d tensor, got shape {tuple(threshold.shape)}")
        if threshold.dtype == torch.bool or threshold.is_complex():
            raise TypeError(f"threshold must be a real number, got dtype {threshold.dtype}")
        if threshold.device != logits.device and threshold.device.type != "cpu":
            raise ValueError(f"threshold is on {threshold.device} but logits is on {logits.device}")
        # NaN would silently mean "nobody ever exits". Checked for CPU tensors only (a GPU value costs a sync).
        if threshold.device.type == "cpu" and not torch.compiler.is_compiling() and bool(torch.isnan(threshold)):
            raise ValueError("threshold is NaN (no confidence compares true with NaN, so nobody would exit); "
                             "use +inf for 'nobody exits'")
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"threshold must be a Python float or a 0-d tensor, got {type(threshold).__name__}")
    if math.isnan(threshold):
        raise ValueError("threshold is NaN (no confidence compares true with NaN, so nobody would exit); "
                         "use +inf for 'nobody exits'")
    # A CPU scalar tensor: the CPU kernel reads it directly, the GPU kernels receive it by value (no copy, no sync).
    return torch.tensor(float(threshold), dtype=torch.float64)


def _check_logits(logits) -> None:
    require_tensor("logits", logits)
    require_dim("logits", logits, 2, "(n, classes)")
    require_dtype("logits", logits, FLOAT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")


def _check_states(states, rows: int, device: torch.device, what: str = "logits") -> None:
    for i, s in enumerate(states):
        require_tensor(f"states[{i}]", s)
        if s.dim() == 0 or s.shape[0] != rows:
            raise ValueError(f"states[{i}] must have {rows} rows (the rows of {what}), got shape {tuple(s.shape)}")
        if s.device != device:
            raise ValueError(f"states[{i}] is on {s.device} but {what} is on {device}; move them to one device")


# ---------------------------------------------------------------------------------------------------- public ops
def exit_compact(logits: torch.Tensor, threshold, *states: torch.Tensor, criterion: str = "max_softmax"):
    """Decide who leaves at an exit and compact the survivors' states, in one pass over each state.

    Args:
        logits: (n, classes) float32/float64/float16/bfloat16 logits of the n samples still running.
        threshold: Python float or 0-d tensor. A row leaves when its confidence >= threshold ("max_softmax",
            "margin") or <= threshold ("entropy"); the threshold is rounded to the confidence's dtype (float32 for
            half types and float32, float64 for float64). NaN confidence never leaves.
        *states: tensors (n, ...) of any dtype (bool and integer included), any trailing shape, any strides.
        criterion: "max_softmax" (largest softmax probability), "entropy" (of the softmax) or "margin"
            (top1 - top2 probability).

    Returns:
        (keep, exited, *compacted): keep (m,) int64 positions (within n) of the survivors, increasing; exited
        (n - m,) int64 positions of the rows that leave, increasing; each state as (m, ...), rows in keep order,
        contiguous. m == 0 and m == n are normal. Gradients flow from the compacted states back into the kept rows.
    """
    _check_logits(logits)
    code = criterion_code(criterion)
    thr = _threshold_tensor(threshold, logits)
    _check_states(states, logits.shape[0], logits.device)
    keep, exited = _backend.call("exit_confidence_mask", logits.device, _exit_confidence_mask_reference, logits, thr,
                                 code)
    if not states:
        return keep, exited
    return (keep, exited, *_backend.call("compact_rows", logits.device, _compact_rows_reference, list(states), keep))


def compact_rows(states, keep: torch.Tensor) -> list[torch.Tensor]:
    """Rows `keep` (int64 (m,), distinct, in range) of every state (n, ...), gathered in one pass: [s[keep], ...]."""
    require_tensor("keep", keep)
    require_dim("keep", keep, 1, "(m,) row positions")
    require_dtype("keep", keep, (torch.int64,))
    states = list(states)
    if not states:
        return []
    _check_states(states, states[0].shape[0] if states[0].dim() else -1, keep.device, what="states[0]")
    if keep.device.type != "cpu" and keep.numel():  # the CPU kernel checks on the host; GPUs assert without a sync
        torch._assert_async(((keep >= 0) & (keep < states[0].shape[0])).all(), "compact_rows: keep out of range")
    return _backend.call("compact_rows", keep.device, _compact_rows_reference, states, keep)


def _check_no_overlap(out: torch.Tensor, values: torch.Tensor) -> None:
    # As index_copy_: writing through an expanded `out` (rows sharing memory), or reading `values` that share memory
    # with `out`, would make the result depend on the order of the row copies.
    if out.numel() and torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"out has rows that share memory (an expanded tensor, strides {tuple(out.stride())}); "
                         "pass a materialised tensor, e.g. out.contiguous()")
    if out.numel() and values.numel() and out.untyped_storage().data_ptr() == values.untyped_storage().data_ptr():
        lo_o = out.data_ptr()
        hi_o = lo_o + sum((n - 1) * st for n, st in zip(out.shape, out.stride())) * out.element_size() + out.element_size()
        lo_v = values.data_ptr()
        hi_v = lo_v + sum((n - 1) * st for n, st in zip(values.shape, values.stride())) * values.element_size() \
            + values.element_size()
        if lo_o < hi_v and lo_v < hi_o:
            raise ValueError("values overlaps out's memory (a view of out); pass a copy, e.g. values.clone()")


def exit_scatter(out: torch.Tensor, batch_index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write row j of `values` into row `batch_index[j]` of `out`, in place, and return `out`.

    Args:
        out: (N, ...) tensor of any dtype.
        batch_index: (k,) int64 destination rows, each in [0, N). Duplicates: on the CPU the LAST occurrence wins
            (the C++ kernel copies only each row's last writer, so no row is ever a mix of two values). On GPUs
            (CUDA, Triton) pass distinct rows: duplicates are written concurrently and a row may mix their values
            (detecting them would cost a host sync per call). `EarlyExitRunner` never produces duplicates.
        values: (k, ...) with out's trailing shape and dtype, on out's device.
    Refused (ValueError), as by `index_copy_`: an `out` whose rows share memory (expanded), and `values` that
    overlap `out`'s memory. Negative strides cannot occur (torch has none); other strides are fine.
    When autograd is recording through `out` or `values` the write is `out.index_copy_` (differentiable);
    otherwise the C++ / CUDA / Triton kernel runs.
    """
    require_tensor("out", out)
    require_tensor("batch_index", batch_index)
    require_tensor("values", values)
    require_dim("batch_index", batch_index, 1, "(k,) destination rows")
    require_dtype("batch_index", batch_index, (torch.int64,))
    require_same_device("out", out, batch_index=batch_index, values=values)
    if out.dim() == 0:
        raise ValueError("out must have a leading row dimension, got a 0-d tensor")
    if values.dim() != out.dim() or tuple(values.shape[1:]) != tuple(out.shape[1:]):
        raise ValueError(f"values must have shape (k, {', '.join(map(str, out.shape[1:]))}) to match out, "
                         f"got {tuple(values.shape)}")
    if values.shape[0] != batch_index.shape[0]:
        raise ValueError(f"values has {values.shape[0]} rows but batch_index has {batch_index.shape[0]}")
    if values.dtype != out.dtype:
        raise TypeError(f"values must have out's dtype {out.dtype}, got {values.dtype}")
    _check_no_overlap(out, values)
    if out.device.type != "cpu" and batch_index.numel():
        # No host sync: the device asserts; the GPU kernels also skip out-of-range rows rather than write them.
        torch._assert_async(((batch_index >= 0) & (batch_index < out.shape[0])).all(),
                            "exit_scatter: batch_index out of range for out's rows")
    grad = torch.is_grad_enabled() and (out.requires_grad or values.requires_grad)
    if grad:
        return exit_scatter_reference(out, batch_index, values)
    _backend.call("exit_scatter", out.device, exit_scatter_reference, out, batch_index, values)
    return out
