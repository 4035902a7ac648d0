"""Triton kernels of exit-masked execution: confidence + exit test per row, survivor positions, row copies.

Roofline (E1: n 256, 1000 classes, states (256,144,28,28) + (256,32,144) fp32, half the rows exit):
  confidence: reads n*C*4 = 1 MB once, one exp per logit (0.26 M exp): negligible; one program per row.
  positions:  n int32 flags in, n int64 positions out: negligible.
  row copies: reads and writes the surviving rows' bytes once: 2 * 128 * (451584 + 18432) B = 120 MB, so the copy
              is bandwidth-bound: ~40 us at 3 TB/s (H100 HBM3). No FLOPs.
Host synchronisation: exactly one per `exit_compact` call (reading the number of exits to size keep / exited and
the compacted states, whose shapes the API fixes to (m, ...)); flags, prefix sums and copies stay on the device.

Every launcher takes torch tensors and checks nothing beyond what it needs: lookfast/ops/exit_compact.py validates
inputs. The end of this file defines the launchers as the ops `lookfast::<library op>_triton`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lookfast.ops import exit_compact as _family



@triton.jit
def exit_confidence_kernel(logits_ptr, stride_row, stride_col, n_cols, threshold_ptr, passes_ptr,
                           CRITERION: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: online (m1, m2, s, t) over the classes (see csrc/common/exit_compact.h), then the test."""
    acc_ty = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    m1 = tl.full((), neg_inf, acc_ty)
    m2 = tl.full((), neg_inf, acc_ty)
    s = tl.zeros((), acc_ty)
    t = tl.zeros((), acc_ty)
    bad = tl.zeros((), tl.int32)  # a NaN or +inf logit: softmax is NaN, so the row never exits
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        x = tl.load(base + offs.to(tl.int64) * stride_col, mask=offs < n_cols, other=neg_inf).to(acc_ty)
        bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
        x = tl.where(x != x, neg_inf, x)
        b1 = tl.max(x, axis=0)
        first = tl.argmax(x, axis=0)
        b2 = tl.max(tl.where(cols == first, neg_inf, x), axis=0)
        new_m1 = tl.maximum(m1, b1)
        m2 = tl.maximum(tl.minimum(m1, b1), tl.maximum(m2, b2))
        d_old = m1 - new_m1
        a = tl.exp(tl.where(s > 0, d_old, 0.0))
        t = tl.where(s > 0, a * (t + d_old * s), 0.0)
        s = tl.where(s > 0, a * s, 0.0)
        live = x > neg_inf
        d = tl.where(live, x - new_m1, 0.0)
        e = tl.where(live, tl.exp(d), 0.0)
        s += tl.sum(e, axis=0)
        t += tl.sum(e * d, axis=0)
        m1 = new_m1
    if CRITERION == 1:
        conf = tl.log(s) - t / s
    elif CRITERION == 2:
        conf = (1.0 - tl.exp(m2 - m1)) / s
    else:
        conf = 1.0 / s
    conf = tl.where((bad > 0) | (m1 == neg_inf), float("nan"), conf)
    thr = tl.load(threshold_ptr).to(acc_ty)
    if CRITERION == 1:
        passes = conf <= thr
    else:
        passes = conf >= thr
    tl.store(passes_ptr + row, passes.to(tl.int32))


@triton.jit
def exit_positions_kernel(passes_ptr, inclusive_ptr, keep_ptr, exited_ptr, n, BLOCK: tl.constexpr):
    """Row i goes to exited[exits before i] when it passes, else to keep[i - exits before i]."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    p = tl.load(passes_ptr + i, mask=inside, other=0)
    before = tl.load(inclusive_ptr + i, mask=inside, other=0).to(tl.int64) - p
    rows = i.to(tl.int64)
    tl.store(exited_ptr + before, rows, mask=inside & (p != 0))
    tl.store(keep_ptr + (rows - before), rows, mask=inside & (p == 0))


@triton.jit
def copy_rows_kernel(src_ptr, dst_ptr, index_ptr, src_row_stride, dst_row_stride, row_elems, index_bound,
                     SCATTER: tl.constexpr, BLOCK: tl.constexpr):
    """Gather (dst row r = src row index[r]) or scatter (dst row index[r] = src row r); grid (rows, chunks).
    An index outside [0, index_bound) is skipped, never followed (the Python side reports it)."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    target = tl.load(index_ptr + r)
    valid = (target >= 0) & (target < index_bound)
    target = tl.where(valid, target, 0)
    inside = offs < tl.where(valid, row_elems, 0)
    if SCATTER:
        src_row = r
        dst_row = target
    else:
        src_row = target
        dst_row = r
    v = tl.load(src_ptr + src_row * src_row_stride + offs, mask=inside)
    tl.store(dst_ptr + dst_row * dst_row_stride + offs, v, mask=inside)


CONFIDENCE_BLOCK_MAX = 2048
POSITIONS_BLOCK = 1024
COPY_BLOCK = 2048


def confidence_block(classes: int) -> int:
    return max(16, min(CONFIDENCE_BLOCK_MAX, triton.next_power_of_2(max(classes, 1))))


def exit_passes(logits: torch.Tensor, threshold: torch.Tensor, criterion: int) -> torch.Tensor:
    """(n,) int32: 1 where row i of `logits` (n, C) leaves (threshold: 0-d tensor on logits' device)."""
    n, classes = logits.shape
    passes = torch.empty(n, dtype=torch.int32, device=logits.device)
    if n == 0:
        return passes
    block = confidence_block(classes)
    exit_confidence_kernel[(n,)](
        logits, logits.stride(0), logits.stride(1), classes, threshold, passes,
        CRITERION=criterion, FP64=logits.dtype == torch.float64, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )
    return passes


def exit_confidence_mask(logits: torch.Tensor, threshold: torch.Tensor, criterion: int):
    """(keep, exited) int64 positions, as torch.ops.lookfast.exit_confidence_mask. One host sync (the exit count)."""
    n = logits.shape[0]
    passes = exit_passes(logits, threshold, criterion)
    inclusive = torch.cumsum(passes, 0, dtype=torch.int32)
    exits = int(inclusive[-1]) if n else 0  # the one host sync: output sizes depend on it
    keep = torch.empty(n - exits, dtype=torch.int64, device=logits.device)
    exited = torch.empty(exits, dtype=torch.int64, device=logits.device)
    if n:
        exit_positions_kernel[(triton.cdiv(n, POSITIONS_BLOCK),)](passes, inclusive, keep, exited, n,
                                                                  BLOCK=POSITIONS_BLOCK)
    return keep, exited


def _as_words(rows2d: torch.Tensor) -> torch.Tensor:
    """A (rows, row_bytes) view of a 2-D tensor with dense rows, as int32 words when alignment allows, else bytes."""
    b = rows2d.view(torch.uint8) if rows2d.dtype != torch.uint8 else rows2d
    if b.shape[1] % 4 == 0 and b.stride(0) % 4 == 0 and b.data_ptr() % 4 == 0:
        return b.view(torch.int32)
    return b


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if _family.compacted_strides(t) is not None:  # rows are dense blocks in another order (channels_last): raw bytes
        return _bool_as_bytes(t.as_strided((t.shape[0], math.prod(t.shape[1:])), (t.stride(0), 1)))
    t2 = t.reshape(t.shape[0], -1)
    if t2.stride(1) != 1:  # one element per row: any stride is dense; else strided rows are made dense
        t2 = t2.as_strided(t2.shape, (t2.stride(0), 1)) if t2.shape[1] <= 1 else t2.contiguous()
    return _bool_as_bytes(t2)


def _bool_as_bytes(t2: torch.Tensor) -> torch.Tensor:
    return t2.view(torch.uint8) if t2.dtype == torch.bool else t2


def _launch_copy(src2d: torch.Tensor, dst2d: torch.Tensor, index: torch.Tensor, scatter: bool) -> None:
    bound = dst2d.shape[0] if scatter else src2d.shape[0]
    rows = index.shape[0]
    if rows == 0 or src2d.shape[1] == 0:
        return
    s, d = _as_words(src2d), _as_words(dst2d)
    if s.dtype != d.dtype:  # alignment differs between the two: fall back to bytes for both
        s, d = src2d.view(torch.uint8), dst2d.view(torch.uint8)
    elems = s.shape[1]
    copy_rows_kernel[(rows, triton.cdiv(elems, COPY_BLOCK))](s, d, index, s.stride(0), d.stride(0), elems, bound,
                                                             SCATTER=scatter, BLOCK=COPY_BLOCK)


def compact_rows(states: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    """Each state's rows gathered in `keep` order (any dtype, any trailing shape; strided rows are made dense)."""
    outs = []
    for s in states:
        out = _family.compacted_empty(s, keep.shape[0])  # dense-block rows (channels_last) keep their layout
        if out.numel():
            _launch_copy(_rows2d(s), _rows2d(out), keep, scatter=False)
        outs.append(out)
    return outs


def exit_scatter(out: torch.Tensor, batch_index: torch.Tensor, values: torch.Tensor) -> None:
    """In place: out[batch_index[j]] = values[j]. `out` must have dense rows (the caller ensures it)."""
    if values.numel() == 0:
        return
    dst = _rows2d(out)
    if dst.data_ptr() != out.data_ptr() or dst.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
        raise ValueError("exit_scatter (triton): out must have dense rows")
    _launch_copy(_rows2d(values), dst, batch_index, scatter=True)


# ------------------------------------------------------------------------------- registration: lookfast::<op>_triton
# The Triton backend of the library ops, defined when lookfast._backend first picks Triton (importing this module).
# Opaque `custom_op`s rather than `triton_op`s: the mask's output sizes are read from the device (one sync), which a
# traced `triton_op` body cannot do, and the copies are pure bandwidth with nothing for Inductor to fuse. Fake
# kernels (unbacked sizes for the mask) and autograd are the library ops' own (lookfast.ops.exit_compact).
@torch.library.custom_op("lookfast::exit_confidence_mask_triton", mutates_args=())
def _exit_confidence_mask_op(logits: torch.Tensor, threshold: torch.Tensor,
                             criterion: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The library op takes a CPU scalar threshold by value; the Triton kernel loads it, so it moves to the device.
    return exit_confidence_mask(logits, threshold.to(logits.device), criterion)


@torch.library.custom_op("lookfast::compact_rows_triton", mutates_args=())
def _compact_rows_op(states: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    return compact_rows(list(states), keep)


@torch.library.custom_op("lookfast::exit_scatter_triton", mutates_args=("out",))
def _exit_scatter_op(out: torch.Tensor, batch_index: torch.Tensor, values: torch.Tensor) -> None:
    if _family.rows_are_contiguous(out):
        exit_scatter(out, batch_index, values)
    else:  # the copy kernel writes dense rows; a strided `out` takes PyTorch's copy
        out.index_copy_(0, batch_index, values)


_family.register_backend("_triton")
