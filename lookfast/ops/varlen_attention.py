"""Variable-length (packed) attention: `lookfast.varlen_attention` and its batched convenience `lookfast.cross_attention`.

Layout and semantics follow FlashAttention's `flash_attn_varlen_func`: the queries of all samples are packed along
dim 0 of `q` (total_q, H, Dh), the keys/values along dim 0 of `k`/`v` (total_k, Hk, Dh|Dv), and `cu_seqlens_q/k`
(B+1,) int32 give each sample's row range. Query head h uses kv head h // (H // Hk) (grouped-query attention).

Backends (see `lookfast._backend`): the library ops `lookfast::varlen_attention_fwd` / `_bwd` (CPU kernel in
csrc/cpu/varlen_attention.cpp, with the bf16 dot-product kernel in csrc/cpu/varlen_attention_lowp.cpp; CUDA kernel in
csrc/cuda/varlen_attention.cu), their Triton twins `lookfast::varlen_attention_fwd_triton` / `_bwd_triton` defined by
`lookfast.kernels.varlen_attention` (imported the first time Triton runs, so CPU users never need triton), and the
pure-PyTorch reference `varlen_attention_reference` (per-sample math).
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from .._validate import (FLOAT_DTYPES, INT32_MAX, require_dim, require_dtype, require_int_range,
                         require_same_device, require_tensor)

__all__ = ["varlen_attention", "cross_attention", "varlen_attention_reference", "varlen_attention_fwd", "check_cu_seqlens"]

_OP = "varlen_attention_fwd"


# --------------------------------------------------------------------------------------------- validation
def _check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    # Needs the values on the host: always done for CPU tensors; for CUDA tensors it would cost a device sync per
    # call, so it is done only when LOOKFAST_CHECK_CU_SEQLENS=1 (the CUDA/Triton kernels guard their own bounds by
    # clamping row ranges to [0, total)).
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    bad = next((i for i, n in enumerate(lengths) if n < 0), None)
    if bad is not None:  # name the first offending pair, never the whole (possibly huge) tensor
        raise ValueError(f"{name} must be non-decreasing, got {name}[{bad}] = {values[bad]} > "
                         f"{name}[{bad + 1}] = {values[bad + 1]}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of packed rows ({total}), got {values[-1]}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sample in {name} ({longest})")


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        require_tensor(name, t)
    require_dim("q", q, 3, "(total_q, H, Dh)")
    require_dim("k", k, 3, "(total_k, Hk, Dh)")
    require_dim("v", v, 3, "(total_k, Hk, Dv)")
    require_dtype("q", q, FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
    require_same_device("q", q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32 (FlashAttention's layout), got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be 1-D (B+1,), got shape {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} samples but cu_seqlens_k has {cu_seqlens_k.numel() - 1}"
        )
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same rows and kv heads")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head dim {q.shape[2]} != k head dim {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    # Lengths and offsets are int32 (FlashAttention's layout): larger ints would otherwise fail deep in the
    # dispatcher with a message naming no argument.
    require_int_range("max_seqlen_q", max_seqlen_q, 0, INT32_MAX, " (int32 sequence lengths)")
    require_int_range("max_seqlen_k", max_seqlen_k, 0, INT32_MAX, " (int32 sequence lengths)")
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] > INT32_MAX:
            raise ValueError(f"{name} has {t.shape[0]} packed rows; int32 cu_seqlens address at most 2**31 - 1")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2]) if q.shape[2] > 0 else 1.0
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return softmax_scale


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, max_seqlen_q: int,
                     max_seqlen_k: int) -> None:
    """The values of cu_seqlens against the row counts and max lengths (ValueError naming the argument). Reads them on
    the host: done for CPU tensors, and for CUDA tensors only with LOOKFAST_CHECK_CU_SEQLENS=1 (a device sync);
    skipped while torch.compile traces. Callers running many attentions over one layout (a model's blocks) check once."""
    if torch.compiler.is_compiling():
        return
    if cu_seqlens_q.device.type == "cpu" or _env_flag("LOOKFAST_CHECK_CU_SEQLENS"):
        _check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
        _check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")


def _env_flag(name: str) -> bool:
    import os

    return os.environ.get(name, "") == "1"


# --------------------------------------------------------------------------------------------- autocast
# Under torch.autocast attention behaves as scaled_dot_product_attention (a "lower_precision_fp" op on CPU and CUDA):
# float32/float16/bfloat16 q, k, v run in the autocast dtype; float64 is left alone. Outside autocast, mismatched
# dtypes are refused (see _validate).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(device_type: str):
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t


def _autocast_inputs(q, k, v):
    if not isinstance(q, torch.Tensor):
        return q, k, v  # _validate names the bad argument
    dtype = _autocast_dtype(q.device.type)
    if dtype is None:
        return q, k, v
    return _autocast_cast(q, dtype), _autocast_cast(k, dtype), _autocast_cast(v, dtype)


# Autocast kernels for the ops themselves (direct torch.ops.lookfast calls): cast q, k, v as above, then run the op
# with the autocast key excluded (the pattern of torch.library.register_autocast, with the autocast dtype read at call
# time instead of fixed at registration).
_AUTOCAST_LIB = torch.library.Library("lookfast", "FRAGMENT")


def _register_autocast(qualname: str) -> None:
    op = getattr(torch.ops.lookfast, qualname.split("::")[1]).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def _impl(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            q, k, v = (_autocast_cast(t, dtype) for t in args[:3])
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(q, k, v, *args[3:])

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(_impl)
        _AUTOCAST_LIB.impl(qualname.split("::")[1], lambda _ks, *args, _f=_impl: _f(*args), key_name, with_keyset=True)


# --------------------------------------------------------------------------------------------- reference
def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal=False):
    """Pure-PyTorch reference: per-sample softmax(q k^T * scale) v in float32 (float64 for float64 inputs).

    Returns (out (total_q, H, Dv) in q's dtype, lse (H, total_q) float32). Differentiable through plain torch.
    Queries that see no key output exact zeros and lse = -inf (whatever v holds). NaN semantics are softmax's: a NaN
    or +inf score, or only -inf scores, make that query's output NaN; a NaN in v makes NaN the outputs of the queries
    that see that key.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads, kv_heads, dv = q.shape[1], k.shape[1], v.shape[2]
    group = heads // kv_heads
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b] : cu_q[b + 1]].to(compute).transpose(0, 1)  # (H, Lq, Dh)
        ks = k[cu_k[b] : cu_k[b + 1]].to(compute).transpose(0, 1).repeat_interleave(group, 0)
        vs = v[cu_k[b] : cu_k[b + 1]].to(compute).transpose(0, 1).repeat_interleave(group, 0)
        len_q, len_k = qs.shape[1], ks.shape[1]
        s = torch.matmul(qs, ks.transpose(1, 2)) * softmax_scale  # (H, Lq, Lk)
        row = torch.arange(len_q, device=q.device)[:, None]
        col = torch.arange(len_k, device=q.device)[None, :]
        visible = col <= row + (len_k - len_q) if causal else torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
        empty = ~visible.any(1)  # (Lq,) rows that see no key
        s = s.masked_fill(~visible, float("-inf"))
        s_safe = torch.where(empty[None, :, None], torch.zeros_like(s), s)  # softmax of a fully masked row is NaN
        p = torch.softmax(s_safe, dim=-1)
        # A query that sees no key outputs exact zeros, even when v holds NaN (0 * NaN would leak it).
        o = torch.where(empty[None, :, None], torch.zeros((), dtype=compute, device=q.device), torch.matmul(p, vs))
        outs.append(o.transpose(0, 1))
        lse = torch.logsumexp(s_safe, dim=-1) if len_k > 0 else s_safe.new_zeros(heads, len_q)
        lses.append(torch.where(empty[None, :], torch.full_like(lse, float("-inf")), lse))
    if not outs:
        return q.new_zeros(0, heads, dv), torch.zeros(heads, 0, dtype=torch.float32, device=q.device)
    return torch.cat(outs, 0).to(q.dtype), torch.cat(lses, 1).to(torch.float32)


def _reference_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """The reference with the library op's arguments (the max lengths only size GPU grids)."""
    return varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


# ------------------------------------------------------------- fake kernels and autograd (library and Triton ops)
def _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    return out, lse


def _fake_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, causal)
    ctx.mark_non_differentiable(lse)


def _make_backward(bwd):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal = ctx.params
        if dout is None:
            return (None,) * 9
        dq, dk, dv = bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal)
        return dq, dk, dv, None, None, None, None, None, None

    return backward


def register_backend(suffix: str) -> None:
    """Fake kernels and autograd of `varlen_attention_fwd<suffix>` / `varlen_attention_bwd<suffix>`: "" for the
    compiled library (done here, at import), "_triton" for the Triton ops (by lookfast.kernels.varlen_attention)."""
    backward_op = f"varlen_attention_bwd{suffix}"
    _backend.register(backward_op, _fake_bwd)
    if _backend.register(f"varlen_attention_fwd{suffix}", _fake_fwd,
                         _make_backward(lambda *a: getattr(torch.ops.lookfast, backward_op)(*a)), _setup_context):
        _register_autocast(f"lookfast::varlen_attention_fwd{suffix}")


register_backend("")


# --------------------------------------------------------------------------------------------- public API
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
):
    """Attention over packed variable-length samples (FlashAttention's `flash_attn_varlen_func` argument order).

    Args:
        q: (total_q, H, Dh) float32/float64/float16/bfloat16, the queries of all samples packed along dim 0.
        k: (total_k, Hk, Dh), same dtype and device; H must be a multiple of Hk (query head h uses kv head
            h // (H // Hk)).
        v: (total_k, Hk, Dv).
        cu_seqlens_q, cu_seqlens_k: (B+1,) int32, cumulative row offsets starting at 0, non-decreasing, ending at
            total_q / total_k. Samples may have zero queries or zero keys.
        max_seqlen_q, max_seqlen_k: ints >= the longest sample (checked for CPU tensors).
        softmax_scale: scale of q.k before the softmax; default 1/sqrt(Dh).
        causal: bottom-right aligned causal mask (query i of a sample with Lq queries and Lk keys sees keys
            j <= i + Lk - Lq), as FlashAttention.
        return_lse: also return the (H, total_q) float32 natural-log log-sum-exp of the scaled scores.

    Returns:
        out (total_q, H, Dv) in q's dtype, or (out, lse) with return_lse. A query that sees no key (zero-key sample,
        or masked out by causality) gets exact zeros and lse = -inf, whatever v holds. Differentiable in q, k and v
        (not through lse).

    NaN and inf (every backend, every dtype), as softmax(q k^T * scale) v computes them: a query whose scores hold
    a NaN or +inf (NaN/inf in q or in a key it sees, or q.k * softmax_scale overflowing the compute type: float32
    for half types) outputs NaN, with lse NaN (NaN scores) or +inf/NaN; a NaN or inf in v makes NaN the outputs of
    the queries that see that key (lse stays finite). Nothing is silently dropped: a diverging run shows NaN.

    Precision (CPU kernels), per input dtype:
        float64: end to end in float64, softmax statistics included (the backward recomputes each row's max and sum
            in float64 rather than using the float32 lse), so gradients agree with float64 math to ~1e-12.
        float32: float32 throughout; the backward normalises probabilities as softmax does (exp(s - max) / sum,
            recomputed per query tile) and meets FlashAttention's 3x rule against PyTorch's float32 math.
        bfloat16: q, k, v, out and gradients stored in bf16; Q.K^T, P.V and the backward's dO.V^T, P^T.dO, dS^T.Q,
            dS.K are bf16 products with float32 accumulation on the CPU's matrix engine, chosen at run time for head
            dims >= 32: oneDNN's brgemm micro-kernel on AMX tiles where the CPU has AMX, the hand-written
            AVX512-BF16 (vdpbf16ps) kernel on CPUs with AVX512-BF16 but no AMX; softmax max/sum/lse, delta
            and accumulators in float32; P and dS rounded to bf16 as GEMM operands; outputs rounded once. Narrower
            heads, CPUs without AVX512-BF16, and LOOKFAST_CPU_ISA=baseline run the portable kernel, which widens to
            float32 and uses float32 FMAs. LOOKFAST_CPU_ISA=brgemm|avx512bf16 forces one matrix kernel (docs/ops.md).
        float16: stored in fp16; on the brgemm kernel where oneDNN has an fp16 micro-kernel on AMX-FP16, else
            computed by the portable kernel in float32 (LOOKFAST_CPU_ISA=brgemm forces oneDNN's AVX512-FP16
            micro-kernel where the CPU has it, measured slower than the portable kernel).
        lse is float32 for every input dtype (one op schema on every device).
    Error against float64 truth is at most 2x (out) / 3x (gradients) that of plain PyTorch attention in the same
    low precision (tests/test_varlen_attention_lowp.py).

    Autocast: under torch.autocast (CPU or CUDA) this behaves as scaled_dot_product_attention: float32/float16/bfloat16
    q, k, v are cast to the autocast dtype (mixed dtypes are fine there); float64 is left alone. Outside autocast,
    q, k and v must share a dtype (TypeError naming the argument otherwise).

    cu_seqlens values are checked on the host for CPU tensors; for CUDA tensors that would sync the device on every
    call, so it is done only with LOOKFAST_CHECK_CU_SEQLENS=1 (the GPU kernels stay in bounds regardless).
    """
    q, k, v = _autocast_inputs(q, k, v)
    scale = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal))
    return (out, lse) if return_lse else out


def varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                         softmax_scale: float, causal: bool):
    """`varlen_attention` without the checks: the library op `lookfast::varlen_attention_fwd` (or its Triton twin, or
    the reference, as lookfast._backend chooses) on validated arguments, returning (out, lse).

    For callers that run many attentions over one layout and validated it once (the models' blocks, after
    `check_cu_seqlens`): the arguments must satisfy `varlen_attention`'s contract, softmax_scale a float, causal a
    bool. Differentiable like `varlen_attention`."""
    return _backend.call(_OP, q.device, _reference_fwd, q.contiguous(), k.contiguous(), v.contiguous(),
                         cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None):
    """Batched attention over (B, L, H, D) tensors, run by the varlen kernels.

    Args:
        q: (B, Lq, H, Dh). k: (B, Lk, Hk, Dh). v: (B, Lk, Hk, Dv); H a multiple of Hk; one dtype and device.
        kv_lengths: optional (B,) integer tensor; keys at positions >= kv_lengths[b] of sample b are ignored
            (a length of 0 gives zeros for that sample).

    Returns:
        (B, Lq, H, Dv) in q's dtype, softmax(q k^T / sqrt(Dh)) v per sample and head. Under torch.autocast, in the
        autocast dtype (as varlen_attention).

    Without kv_lengths the packing is a view (no copy) for contiguous inputs; with kv_lengths the kept keys are
    gathered (one copy of k and v; for CUDA tensors this needs a host sync for the total length).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(name, t)
    require_dim("q", q, 4, "(B, Lq, H, Dh)")
    require_dim("k", k, 4, "(B, Lk, Hk, Dh)")
    require_dim("v", v, 4, "(B, Lk, Hk, Dv)")
    batch, len_q, heads, _ = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"k and v must have batch {batch} like q, got {k.shape[0]} and {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k has {k.shape[1]} keys per sample but v has {v.shape[1]}")
    len_k = k.shape[1]
    for name, t, rows in (("q", q, "B*Lq"), ("k", k, "B*Lk")):
        if t.shape[0] * t.shape[1] > INT32_MAX:
            raise ValueError(f"{name} {tuple(t.shape)} packs {rows} = {t.shape[0] * t.shape[1]} rows, more than the "
                             f"int32 offsets of the varlen kernels address (2**31 - 1); split the batch")
    step_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    cu_q = step_q * len_q
    q_packed = q.reshape(batch * len_q, heads, q.shape[3])
    if kv_lengths is None:
        cu_k = step_q * len_k
        k_packed = k.reshape(batch * len_k, k.shape[2], k.shape[3])
        v_packed = v.reshape(batch * len_k, v.shape[2], v.shape[3])
    else:
        require_tensor("kv_lengths", kv_lengths)
        require_same_device("q", q, kv_lengths=kv_lengths)
        if kv_lengths.dtype.is_floating_point or kv_lengths.dtype.is_complex or kv_lengths.dtype == torch.bool:
            raise TypeError(f"kv_lengths must be an integer tensor, got {kv_lengths.dtype}")
        if kv_lengths.shape != (batch,):
            raise ValueError(f"kv_lengths must have shape ({batch},), got {tuple(kv_lengths.shape)}")
        if not torch.compiler.is_compiling() and q.device.type == "cpu":
            lo, hi = int(kv_lengths.min()) if batch else 0, int(kv_lengths.max()) if batch else 0
            if lo < 0 or hi > len_k:
                raise ValueError(f"kv_lengths must lie in [0, {len_k}], got values in [{lo}, {hi}]")
        lengths = kv_lengths.to(torch.int32)
        cu_k = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=torch.int32)])
        keep = (torch.arange(len_k, device=q.device)[None, :] < lengths[:, None]).reshape(-1)
        k_packed = k.reshape(batch * len_k, k.shape[2], k.shape[3])[keep]
        v_packed = v.reshape(batch * len_k, v.shape[2], v.shape[3])[keep]
    scale = _validate(q_packed, k_packed, v_packed, cu_q, cu_k, len_q, len_k, None)
    if kv_lengths is not None:  # without kv_lengths the offsets are multiples of the lengths: nothing to check
        check_cu_seqlens(cu_q, cu_k, q_packed.shape[0], k_packed.shape[0], len_q, len_k)
    out, _ = varlen_attention_fwd(q_packed, k_packed, v_packed, cu_q, cu_k, len_q, len_k, scale, False)
    return out.reshape(batch, len_q, heads, v.shape[3])
