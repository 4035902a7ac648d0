"""Variable-length (packed, FlashAttention layout) attention in Triton: forward and backward.

Layout: q (total_q, H, Dh), k (total_k, Hk, Dh), v (total_k, Hk, Dv), cu_seqlens_q/k (B+1,) int32; query head h reads
kv head h // (H // Hk). Causal masking is bottom-right aligned: query i of a sample with Lq queries and Lk keys sees
keys j <= i + (Lk - Lq). A query that sees no key gets out = 0 and lse = -inf; one whose visible scores are all
-inf gets out = NaN (softmax's 0 / 0) and lse = -inf.

Roofline (per sample and head, Lq queries, Lk keys; fwd FLOPs 2*Lq*Lk*(Dh+Dv), bwd about 2.5x that):
  bytes fwd = (Lq*Dh + Lq*Dv) * e + ceil(Lq/BLOCK_M) * Lk*(Dh+Dv) * e + 4*Lq   (e = element size; K/V re-read per
  query block, mostly from L2). H100 SXM: 3.35 TB/s HBM, ~990 TFLOP/s fp16/bf16 tensor cores, ~67 TFLOP/s fp32 FMA.
  - A3 LookWhere extractor (B 16, 5+k_i ~ 165 tokens, sum L^2 ~ 5.1e5, 12 heads, Dh 64): 1.58 GFLOP forward.
    fp16: 16.2 MB of q/k/v/out -> 4.8 us of HBM vs 1.6 us of tensor-core time: memory bound, ~5 us at the roofline
    (960 programs of 64 queries, many exit at once on short samples; expect ~10 us). fp32 (IEEE dot on FMA units, the
    1e-5 contract of docs/ops.md): 32 MB -> 10 us vs 24 us of FMA: compute bound, ~25-35 us. A4 backward: ~3.9 GFLOP and
    ~32 MB (fp16): ~10-20 us fp16, ~60 us fp32.
  - A2 Dyn-Perceiver z->x (B 16, 3136 queries x 64 keys, width 8, fp32): 0.10 GFLOP (0.21 with the width padded to 16
    for tl.dot), 3.4 MB (q and out dominate) -> 1.0 us of HBM vs ~3 us of FMA: compute bound at ~3 us, launch-latency
    bound in practice (the CUDA C++ kernel, no padding, is the better fit here).

Precision per dtype: bf16/fp16 operands feed tl.dot in their own dtype (mma.sync on sm_80, wgmma on sm_90: exact
products, fp32 accumulation; tests/test_varlen_attention_triton.py checks the PTX holds them); the probabilities and
dS are rounded to the input dtype only as the second dot's operand, softmax statistics (m, l, lse, delta) stay fp32
and the output is rounded once on the store. fp32 inputs use exact (ieee) fp32 products, never TF32.
bf16 tensor-core roofline (H100 SXM ~990 TFLOP/s dense, A100 ~312): A3 forward 1.58 GFLOP -> 1.6 us (H100) / 5 us
(A100) of mma time vs 16 MB -> 4.8 us of HBM: memory bound on an H100, balanced on an A100; the exp2 of 5.1e5*12
scores (~0.2 us of MUFU) is not the limit.

Backward: delta = rowsum(dout * out) (one preprocessing kernel), then dk/dv per (key block, sample, kv head) looping
over the H/Hk grouped query heads and the query blocks, and dq per (query block, sample, head) looping over key
blocks. No atomics: every output element has exactly one writer, so the result is deterministic.

The launchers take torch tensors and launch through torch.library.wrap_triton; under TRITON_INTERPRET=1 they run on
CPU tensors. The end of this file defines them as the ops `lookfast::varlen_attention_fwd_triton` / `_bwd_triton`.

Robustness: every program reads its sample's bounds from cu_seqlens, and query blocks are visited with a grid-stride
loop, so a too-small max_seqlen_q costs speed, never correctness; key loops run to the sample's own length.
Grid dimensions 1 and 2 (samples, heads) are limited to 65535 by CUDA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lookfast.kernels._launch import launch as _launch
from lookfast.ops import varlen_attention as _family

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAX_HEAD_DIM = 256


@triton.jit
def _load_rows(base, row0, stride_t, offs_r, row_valid, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # rows row0 + offs_r of a (tokens, D) view at `base` (head offset included), zero-padded to BLOCK_D columns;
    # a row-only mask when the head dim needs no padding keeps the loads vectorised
    ptrs = base + row0 * stride_t + offs_r[:, None] * stride_t + offs_d[None, :]
    if D == BLOCK_D:
        tile = tl.load(ptrs, mask=row_valid[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    return tile


@triton.jit
def _store_rows(base, row0, stride_t, offs_r, value, row_valid, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # the inverse of _load_rows: the first D columns of `value` to rows row0 + offs_r
    ptrs = base + row0 * stride_t + offs_r[:, None] * stride_t + offs_d[None, :]
    if D == BLOCK_D:
        tl.store(ptrs, value, mask=row_valid[:, None])
    else:
        tl.store(ptrs, value, mask=row_valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def _sample_bounds(cu_q, cu_k, b):
    q_start = tl.load(cu_q + b)
    lq = tl.load(cu_q + b + 1) - q_start
    k_start = tl.load(cu_k + b)
    lk = tl.load(cu_k + b + 1) - k_start
    return q_start, lq, k_start, lk


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # IEEE: exact fp32 products (the float32 contract of docs/ops.md), for fp32 inputs. Otherwise the operands are
    # bf16/fp16 and go to the tensor cores as they are, accumulating in fp32 (Triton's default for these dtypes)
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _key_end(m0, lq, lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    # keys past this bound are hidden from every query of the block m0 .. m0 + BLOCK_M - 1
    n_end = lk
    if CAUSAL:
        n_end = tl.minimum(lk, tl.maximum(m0 + BLOCK_M + lk - lq, 0))
    return n_end


@triton.jit
def _causal_mask(keep, offs_m, offs_n, lq, lk, CAUSAL: tl.constexpr):
    # (queries, keys) mask; bottom-right alignment: key n is visible to query m when n <= m + (lk - lq)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + (lk - lq))
    return keep


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, Out, Lse, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_q, group, qk_scale_log2,
    DK: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // group
    q_start, lq, k_start, lk = _sample_bounds(cu_q, cu_k, b)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    q_base = Q + h.to(tl.int64) * stride_qh
    k_base = K + kvh.to(tl.int64) * stride_kh
    v_base = V + kvh.to(tl.int64) * stride_vh
    for m0 in range(pid_m * BLOCK_M, lq, tl.num_programs(0) * BLOCK_M):
        offs_m = m0 + offs_m0
        m_valid = offs_m < lq
        row0 = (q_start + m0).to(tl.int64)
        q = _load_rows(q_base, row0, stride_qt, offs_m0, m_valid, offs_dk, DK, BLOCK_DK)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        n_end = _key_end(m0, lq, lk, CAUSAL, BLOCK_M)
        for n0 in range(0, n_end, BLOCK_N):
            offs_n = n0 + offs_n0
            n_valid = offs_n < lk
            krow0 = (k_start + n0).to(tl.int64)
            k = _load_rows(k_base, krow0, stride_kt, offs_n0, n_valid, offs_dk, DK, BLOCK_DK)
            v = _load_rows(v_base, krow0, stride_vt, offs_n0, n_valid, offs_dv, DV, BLOCK_DV)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale_log2
            keep = _causal_mask(n_valid[None, :], offs_m, offs_n, lq, lk, CAUSAL)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        has_keys = l_i > 0.0
        # a query that sees no key outputs 0; one whose visible scores are all -inf (sum 0 too) NaN, softmax's 0 / 0
        if CAUSAL:
            sees = (offs_m + (lk - lq) >= 0) & (lk > 0)
        else:
            sees = (offs_m >= 0) & (lk > 0)
        out = acc / tl.where(has_keys, l_i, tl.where(sees, float("nan"), 1.0))[:, None]
        _store_rows(Out + h.to(tl.int64) * stride_oh, row0, stride_ot, offs_m0, out.to(Out.dtype.element_ty), m_valid,
                    offs_dv, DV, BLOCK_DV)
        # -inf when the sum is 0 (no key, or only -inf scores); NaN when a NaN or +inf score made it NaN
        no_sum = l_i == 0.0
        lse = tl.where(no_sum, float("-inf"), (m_i + tl.log2(tl.where(no_sum, 1.0, l_i))) * 0.6931471805599453)
        tl.store(Lse + h.to(tl.int64) * total_q + q_start + offs_m, lse, mask=m_valid)


@triton.jit
def _varlen_bwd_delta_kernel(
    Out, dOut, Delta, stride_ot, stride_oh, stride_dot, stride_doh, total_q, H, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # delta[h, t] = sum_d dout[t, h, d] * out[t, h, d]; one program per BLOCK_M tokens of one head
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_M)
    offs_t = pid * BLOCK_M + offs_l
    offs_d = tl.arange(0, BLOCK_DV)
    row0 = pid.to(tl.int64) * BLOCK_M
    t_valid = offs_t < total_q
    o = _load_rows(Out + h.to(tl.int64) * stride_oh, row0, stride_ot, offs_l, t_valid, offs_d, DV, BLOCK_DV)
    do = _load_rows(dOut + h.to(tl.int64) * stride_doh, row0, stride_dot, offs_l, t_valid, offs_d, DV, BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h.to(tl.int64) * total_q + offs_t, delta, mask=t_valid)


@triton.jit
def _varlen_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_q, group, sm_scale,
    DK: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Works on transposed scores (keys x queries) so that dk and dv accumulate without any transposition of p.
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start, lq, k_start, lk = _sample_bounds(cu_q, cu_k, b)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    qk_scale_log2 = sm_scale * 1.4426950408889634
    for n0 in range(pid_n * BLOCK_N, lk, tl.num_programs(0) * BLOCK_N):
        offs_n = n0 + offs_n0
        n_valid = offs_n < lk
        krow0 = (k_start + n0).to(tl.int64)
        k = _load_rows(K + kvh.to(tl.int64) * stride_kh, krow0, stride_kt, offs_n0, n_valid, offs_dk, DK, BLOCK_DK)
        v = _load_rows(V + kvh.to(tl.int64) * stride_vh, krow0, stride_vt, offs_n0, n_valid, offs_dv, DV, BLOCK_DV)
        dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        m_begin = 0
        if CAUSAL:
            # the first query that sees key n0 is n0 - (lk - lq); start at its block
            m_begin = tl.maximum(n0 - (lk - lq), 0) // BLOCK_M * BLOCK_M
        for g in range(0, group):
            h = kvh * group + g
            for m0 in range(m_begin, lq, BLOCK_M):
                offs_m = m0 + offs_m0
                m_valid = offs_m < lq
                row0 = (q_start + m0).to(tl.int64)
                q = _load_rows(Q + h.to(tl.int64) * stride_qh, row0, stride_qt, offs_m0, m_valid, offs_dk, DK, BLOCK_DK)
                do = _load_rows(dOut + h.to(tl.int64) * stride_doh, row0, stride_dot, offs_m0, m_valid, offs_dv, DV,
                                BLOCK_DV)
                lse = tl.load(Lse + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_valid, other=0.0)
                delta = tl.load(Delta + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_valid, other=0.0)
                st = _dot(k, tl.trans(q), IEEE)
                keep = n_valid[:, None] & m_valid[None, :]
                if CAUSAL:
                    keep = keep & (offs_n[:, None] <= offs_m[None, :] + (lk - lq))
                # masked entries may hold exp2(+inf) (queries with lse = -inf); tl.where drops them before any use
                pt = tl.where(keep, tl.exp2(st * qk_scale_log2 - lse[None, :] * 1.4426950408889634), 0.0)
                dv += _dot(pt.to(do.dtype), do, IEEE)
                dpt = _dot(v, tl.trans(do), IEEE)
                dst = pt * (dpt - delta[None, :])
                dk += _dot(dst.to(q.dtype), q, IEEE)
        dk = dk * sm_scale
        _store_rows(dK + kvh.to(tl.int64) * stride_dkh, krow0, stride_dkt, offs_n0, dk.to(dK.dtype.element_ty), n_valid,
                    offs_dk, DK, BLOCK_DK)
        _store_rows(dV + kvh.to(tl.int64) * stride_dvh, krow0, stride_dvt, offs_n0, dv.to(dV.dtype.element_ty), n_valid,
                    offs_dv, DV, BLOCK_DV)


@triton.jit
def _varlen_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total_q, group, sm_scale,
    DK: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // group
    q_start, lq, k_start, lk = _sample_bounds(cu_q, cu_k, b)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    qk_scale_log2 = sm_scale * 1.4426950408889634
    k_base = K + kvh.to(tl.int64) * stride_kh
    v_base = V + kvh.to(tl.int64) * stride_vh
    for m0 in range(pid_m * BLOCK_M, lq, tl.num_programs(0) * BLOCK_M):
        offs_m = m0 + offs_m0
        m_valid = offs_m < lq
        row0 = (q_start + m0).to(tl.int64)
        q = _load_rows(Q + h.to(tl.int64) * stride_qh, row0, stride_qt, offs_m0, m_valid, offs_dk, DK, BLOCK_DK)
        do = _load_rows(dOut + h.to(tl.int64) * stride_doh, row0, stride_dot, offs_m0, m_valid, offs_dv, DV, BLOCK_DV)
        lse2 = tl.load(Lse + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
        n_end = _key_end(m0, lq, lk, CAUSAL, BLOCK_M)
        for n0 in range(0, n_end, BLOCK_N):
            offs_n = n0 + offs_n0
            n_valid = offs_n < lk
            krow0 = (k_start + n0).to(tl.int64)
            k = _load_rows(k_base, krow0, stride_kt, offs_n0, n_valid, offs_dk, DK, BLOCK_DK)
            v = _load_rows(v_base, krow0, stride_vt, offs_n0, n_valid, offs_dv, DV, BLOCK_DV)
            s = _dot(q, tl.trans(k), IEEE)
            dp = _dot(do, tl.trans(v), IEEE)
            keep = _causal_mask(m_valid[:, None] & n_valid[None, :], offs_m, offs_n, lq, lk, CAUSAL)
            p = tl.where(keep, tl.exp2(s * qk_scale_log2 - lse2[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        dq = dq * sm_scale
        _store_rows(dQ + h.to(tl.int64) * stride_dqh, row0, stride_dqt, offs_m0, dq.to(dQ.dtype.element_ty), m_valid,
                    offs_dk, DK, BLOCK_DK)


def _pad_dim(d: int) -> int:
    # tl.dot needs every dimension >= 16; narrower heads are zero-padded through masked loads
    return max(16, triton.next_power_of_2(d))


def fwd_config(dk: int, dv: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options of the forward kernel for head dims (dk, dv) and input dtype."""
    d = max(_pad_dim(dk), _pad_dim(dv))
    wide = dtype == torch.float32
    if d <= 32:
        return dict(BLOCK_M=32 if wide else 64, BLOCK_N=64, num_warps=4, num_stages=2)
    if d <= 64:
        return dict(BLOCK_M=32 if wide else 64, BLOCK_N=32 if wide else 64, num_warps=4, num_stages=2)
    if d <= 128:
        return dict(BLOCK_M=16 if wide else 32, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=16 if wide else 32, num_warps=4, num_stages=1)


def bwd_config(dk: int, dv: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options of the two backward kernels (dk/dv and dq).

    `num_warps` is the dq kernel's, `dkdv_num_warps` the dk/dv kernel's (a `_config` without it uses num_warps).
    Chosen from ptxas reports of Triton 3.6 and 3.9 for sm_80 and sm_90 (tests/test_varlen_attention_triton.py, AOT):
    no spills on either. Triton 3.6 spills 4 bytes in dq at head dim <= 32 in bf16/fp16 with 4 warps (sm_90) and in
    dk/dv at head dim 64 in fp32 with 4 warps (sm_80), hence 8 and 2 warps there.
    """
    d = max(_pad_dim(dk), _pad_dim(dv))
    wide = dtype == torch.float32
    if d <= 32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4 if wide else 8)
    elif d <= 64:
        cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, dkdv_num_warps=2) if wide else \
            dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)
    elif d <= 128:
        cfg = dict(BLOCK_M=16, BLOCK_N=16 if wide else 32, num_warps=8 if wide else 4)
    else:
        cfg = dict(BLOCK_M=16, BLOCK_N=16 if wide else 32, num_warps=8)
    return {"dkdv_num_warps": cfg["num_warps"], **cfg, "num_stages": 1}


def _check(q, k, v, cu_q, cu_k):
    if q.shape[-1] > _MAX_HEAD_DIM or v.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"varlen_attention (Triton): head dims up to {_MAX_HEAD_DIM} are supported, "
                         f"got Dh={q.shape[-1]}, Dv={v.shape[-1]}")
    batch = cu_q.numel() - 1
    if batch > 65535 or q.shape[1] > 65535:
        raise ValueError(f"varlen_attention (Triton): at most 65535 samples and heads, got {batch} and {q.shape[1]}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid_rows(max_seqlen: int, block: int) -> int:
    # the kernels loop (grid-stride) over blocks, so a too-small max_seqlen still covers every row
    return max(1, triton.cdiv(max(int(max_seqlen), 0), block))


def varlen_attention_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                causal, *, out=None, lse=None, _config=None):
    """Forward of packed variable-length attention on torch tensors. Returns (out (total_q, H, Dv) in q's dtype,
    lse (H, total_q) float32). `out`/`lse` may be given preallocated; `_config` overrides block sizes (tests)."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    total_q, heads, dk = q.shape
    dv = v.shape[-1]
    batch = cu_seqlens_q.numel() - 1
    if out is None:
        out = torch.empty((total_q, heads, dv), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or heads == 0:
        return out, lse
    cfg = dict(_config or fwd_config(dk, dv, q.dtype))
    grid = (_grid_rows(max_seqlen_q, cfg["BLOCK_M"]), batch, heads)
    _launch(_varlen_fwd_kernel)[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total_q, heads // k.shape[1], float(softmax_scale) * _LOG2E, dk, dv,
        CAUSAL=bool(causal), IEEE=q.dtype == torch.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DK=_pad_dim(dk), BLOCK_DV=_pad_dim(dv),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def varlen_attention_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale, causal, *, _config=None):
    """Backward of packed variable-length attention: returns (dq, dk, dv) with the shapes and dtypes of q, k, v.
    Probabilities are recomputed from `lse`; nothing of size Lq*Lk is stored."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    total_q, heads, dk_dim = q.shape
    total_k, kv_heads, dv_dim = v.shape
    batch = cu_seqlens_q.numel() - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if batch == 0 or heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if total_q == 0:
        # keys of samples with no query get zero gradients; so do all of them when there is no query at all
        return dq, dk.zero_(), dv.zero_()
    cfg = dict(_config or bwd_config(dk_dim, dv_dim, q.dtype))
    cfg.setdefault("dkdv_num_warps", cfg["num_warps"])
    group = heads // kv_heads
    bdk, bdv = _pad_dim(dk_dim), _pad_dim(dv_dim)
    ieee = q.dtype == torch.float32
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    delta_block = 64
    _launch(_varlen_bwd_delta_kernel)[(triton.cdiv(total_q, delta_block), heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), total_q, heads, dv_dim,
        BLOCK_M=delta_block, BLOCK_DV=bdv, num_warps=4,
    )
    if total_k > 0:
        _launch(_varlen_bwd_dkdv_kernel)[(_grid_rows(max_seqlen_k, cfg["BLOCK_N"]), batch, kv_heads)](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            total_q, group, float(softmax_scale), dk_dim, dv_dim,
            CAUSAL=bool(causal), IEEE=ieee,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DK=bdk, BLOCK_DV=bdv,
            num_warps=cfg["dkdv_num_warps"], num_stages=cfg["num_stages"],
        )
    _launch(_varlen_bwd_dq_kernel)[(_grid_rows(max_seqlen_q, cfg["BLOCK_M"]), batch, heads)](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1),
        total_q, group, float(softmax_scale), dk_dim, dv_dim,
        CAUSAL=bool(causal), IEEE=ieee,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DK=bdk, BLOCK_DV=bdv,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------- registration: lookfast::<op>_triton
# The Triton backend of lookfast::varlen_attention_fwd / _bwd, defined when lookfast._backend first picks Triton
# (importing this module). Opaque `custom_op`s (Inductor has nothing to fuse around a whole attention); CPU tensors
# run the same launchers under TRITON_INTERPRET=1, how the kernels are tested without a GPU. Fake kernels and autograd
# are the library ops' own (lookfast.ops.varlen_attention).
@torch.library.custom_op("lookfast::varlen_attention_fwd_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _varlen_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return varlen_attention_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                       causal)


@torch.library.custom_op("lookfast::varlen_attention_bwd_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _varlen_attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_attention_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, softmax_scale, causal)


_family.register_backend("_triton")
