"""varlen_attention in bf16/fp16 on the CPU, and the per-dtype precision contract.

FlashAttention's rule: against a float64 truth, lookfast's error in a low precision is at most 2x (forward) / 3x
(gradients) the error of plain PyTorch attention math run in that same precision. Every CPU kernel present is tested
with the same bodies (the `isa` fixture, LOOKFAST_CPU_ISA): the automatic choice, the portable kernel (baseline, any
CPU), the hand-written bf16 dot-product kernel (avx512bf16, where the CPU has AVX512-BF16) and the oneDNN brgemm
kernel (brgemm: AMX or AVX512-BF16 for bf16, AMX-FP16 or AVX512-FP16 for fp16); a kernel this CPU lacks is skipped with the reason. Also: float64 gradients to ~1e-12, float32 gradients within 3x of PyTorch's float32 math, NaN propagation,
poisoned outputs, autocast (as scaled_dot_product_attention), opcheck and torch.compile in bf16.
"""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import lookfast
from lookfast import _backend

from oracles import flash_atol
from varlen_inputs import cu_seqlens as _cu
from varlen_inputs import check_outputs_fully_written
from varlen_inputs import make_varlen as _make

needs_cpp = pytest.mark.skipif(not _backend.has_kernel("varlen_attention_fwd", "CPU"), reason="C++ kernel not built")
LOWP = [torch.bfloat16, torch.float16]


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


def _kernel(dtype, head_dim=64, backward=False) -> str:
    """The CPU kernel varlen_attention runs now (under the current LOOKFAST_CPU_ISA) for this dtype and head dim:
    "brgemm", "avx512bf16" or "baseline" (csrc/cpu/varlen_attention_isa.cpp)."""
    return torch.ops.lookfast_cpu.varlen_attention_kernel(dtype, head_dim, backward)


FORCED = ["avx512bf16", "brgemm"]


@pytest.fixture(params=["native", "baseline"] + FORCED)
def isa(request, monkeypatch):
    """Runs a test on the kernel the CPU picks, on the portable one, and on each matrix-engine kernel forced (skipped,
    with the reason, where this CPU lacks it for the test's dtype: forcing it would run another kernel)."""
    if request.param == "native":
        monkeypatch.delenv("LOOKFAST_CPU_ISA", raising=False)
        return request.param
    monkeypatch.setenv("LOOKFAST_CPU_ISA", request.param)
    if request.param in FORCED and _backend.has_kernel("varlen_attention_fwd", "CPU"):
        dtype = request.getfixturevalue("dtype") if "dtype" in request.fixturenames else torch.bfloat16
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-time "forced kernel missing" warning has its own test
            got = _kernel(dtype)
        if got != request.param:
            need = {"avx512bf16": "AVX512-BF16 and bf16 inputs",
                    "brgemm": "an oneDNN brgemm micro-kernel for this dtype (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16 or AVX512-FP16)"}
            pytest.skip(f"LOOKFAST_CPU_ISA={request.param} is not available for {dtype} on this CPU "
                        f"(needs {need[request.param]}); it would run {got}")
    return request.param


def _torch_math(q, k, v, cu_q, cu_k, scale, causal, compute):
    """Plain PyTorch attention per sample with every op in `compute` (the "same precision" peer, and in float64 the
    truth). Queries that see no key give zeros (the op's convention)."""
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        qs = q[cq[b] : cq[b + 1]].to(compute).transpose(0, 1)
        ks = k[ck[b] : ck[b + 1]].to(compute).transpose(0, 1).repeat_interleave(group, 0)
        vs = v[ck[b] : ck[b + 1]].to(compute).transpose(0, 1).repeat_interleave(group, 0)
        lq, lk = qs.shape[1], ks.shape[1]
        s = torch.matmul(qs, ks.transpose(1, 2)) * scale
        row = torch.arange(lq)[:, None]
        col = torch.arange(lk)[None, :]
        visible = col <= row + (lk - lq) if causal else torch.ones(lq, lk, dtype=torch.bool)
        empty = ~visible.any(1)
        s = s.masked_fill(~visible, float("-inf")).masked_fill(empty[None, :, None], 0.0)
        p = torch.softmax(s, dim=-1) * (~empty)[None, :, None].to(compute)
        outs.append(torch.matmul(p, vs).transpose(0, 1))
    if not outs:
        return q.new_zeros(0, heads, v.shape[2]).to(compute)
    return torch.cat(outs, 0)


def _err(x, truth):
    return (x.double() - truth).abs().max().item() if truth.numel() else 0.0


def _grads(fn, q, k, v, dout):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(qq, kk, vv)
    return (out, *torch.autograd.grad(out, (qq, kk, vv), dout.to(out.dtype)))


CASES = [
    # lens_q, lens_k, H, Hk, Dh, Dv
    ([5, 0, 17, 1, 40, 3], [7, 3, 0, 1, 300, 9], 6, 2, 13, 9),  # zero queries/keys, single rows, > 256 keys
    ([1, 33, 0], [29, 1, 4], 6, 3, 24, 17),
    ([19, 2, 77], [6, 6, 21], 4, 1, 64, 64),  # MQA, LookWhere's head width
    ([130, 3], [16, 49], 2, 2, 8, 8),  # Dyn-Perceiver z->x (many queries, few keys, width 8)
    ([49, 50], [128, 7], 3, 3, 32, 32),  # x->z-like
    ([0, 0], [0, 5], 2, 2, 8, 5),
    ([300, 2, 1], [520, 1, 0], 3, 1, 48, 40),  # > 256 queries (two work items), > 512 keys (three key blocks)
]


def _check_rule(case, causal, dtype, scale=None, std=1.0):
    lens_q, lens_k, h, hk, dh, dv = case
    q, k, v, cu_q, cu_k, mq, mk = _make(lens_q, lens_k, h, hk, dh, dv, dtype, std)
    scale = dh**-0.5 if scale is None else scale
    dout = torch.randn(q.shape[0], h, dv, dtype=torch.float64).to(dtype)
    ours = _grads(lambda a, b, c: lookfast.varlen_attention(a, b, c, cu_q, cu_k, mq, mk, scale, causal), q, k, v, dout)
    peer = _grads(lambda a, b, c: _torch_math(a, b, c, cu_q, cu_k, scale, causal, dtype), q, k, v, dout)
    truth = _grads(lambda a, b, c: _torch_math(a, b, c, cu_q, cu_k, scale, causal, torch.float64), q, k, v, dout)
    for i, (name, factor) in enumerate((("out", 2.0), ("dq", 3.0), ("dk", 3.0), ("dv", 3.0))):
        assert ours[i].dtype == dtype and ours[i].shape == truth[i].shape
        e_ours, e_peer = _err(ours[i], truth[i]), _err(peer[i], truth[i])
        # FlashAttention's slack (one to two ulps at the values' scale, at least a quarter ulp of the largest) only
        # matters where torch's own result happens to be exact (rows with one or two keys: a quarter ulp alone failed
        # 1 seed in 15 there, on every kernel)
        floor = flash_atol(truth[i], dtype)
        assert e_ours <= factor * e_peer + floor, f"{name}: lookfast {e_ours:.3g} vs torch {dtype} {e_peer:.3g}"


@needs_cpp
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_lowp_forward_and_gradients_meet_flash_rule(seed, isa, dtype, causal, case):
    _check_rule(CASES[case], causal, dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", LOWP)
def test_lowp_random_shapes(seed, isa, dtype):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    hk = r(1, 3)
    case = ([r(0, 70) for _ in range(3)], [r(0, 300) for _ in range(3)], hk * r(1, 3), hk, r(1, 72), r(1, 72))
    _check_rule(case, bool(r(0, 1)), dtype, scale=0.05 + torch.rand(1, generator=g).item())


# The bf16 dot-product kernel's edges (bf16 with head dim >= 32 takes it where the CPU has AVX512-BF16): head dims
# 32/40/64/80/128 and odd ones, value widths that are not a multiple of 16 or of 2, query tiles of odd size (the
# backward pairs query rows), several 256-key blocks, samples with 0 or 1 queries or keys, GQA, few keys for many
# queries and few queries for many keys. The outputs land in NaN-poisoned memory: an unwritten element fails the rule.
DOT_CASES = [
    # lens_q, lens_k, H, Hk, Dh, Dv
    ([33, 0, 1, 65], [1, 4, 0, 600], 4, 2, 32, 31),
    ([1, 97, 31], [290, 3, 31], 2, 1, 40, 40),
    ([63, 2], [513, 17], 3, 3, 64, 65),
    ([129, 5, 0], [2, 1, 7], 2, 2, 80, 80),  # few keys, many queries
    ([3, 1], [257, 300], 2, 1, 128, 128),  # few queries, many keys
    ([70], [70], 1, 1, 33, 1),  # odd head dim, value width 1
]


@needs_cpp
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", range(len(DOT_CASES)))
def test_dot_kernel_edges_meet_flash_rule(seed, isa, causal, case):
    lens_q, lens_k, h, hk, dh, dv = DOT_CASES[case]
    largest = max(sum(lens_q) * h * max(dh, dv), sum(lens_k) * hk * max(dh, dv))
    for _ in range(3):  # the allocator's free blocks of the outputs' sizes, filled with NaN
        junk = [torch.full((n,), float("nan"), dtype=torch.bfloat16) for n in (largest, largest // 2 + 1)]
        del junk
    _check_rule(DOT_CASES[case], causal, torch.bfloat16)


@pytest.mark.cpu_kernel
@needs_cpp
def test_matrix_kernels_run_where_the_cpu_has_them(seed, monkeypatch):
    # bf16 with head dim >= 32 must take a matrix-engine kernel where the CPU has one (the automatic choice and each
    # forced kernel the query names): their rounding (P in bf16 before P.V) differs from the portable kernel's float32
    # P, so the results differ in some bits; where none is present every setting runs the portable kernel.
    q, k, v, cu_q, cu_k, mq, mk = _make([40, 7], [50, 9], 2, 1, 32, 32, torch.bfloat16)
    monkeypatch.setenv("LOOKFAST_CPU_ISA", "baseline")
    portable = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk)
    monkeypatch.setenv("LOOKFAST_CPU_ISA", "auto")
    auto = _kernel(torch.bfloat16, 32)
    for setting in ["auto"] + FORCED:
        monkeypatch.setenv("LOOKFAST_CPU_ISA", setting)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = _kernel(torch.bfloat16, 32)
            out = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk)
        assert kernel in (setting, auto), (setting, kernel, auto)  # the forced kernel, or the fallback
        assert torch.equal(out, portable) == (kernel == "baseline"), (setting, kernel)
    if _cpu_has_avx512_bf16():
        monkeypatch.delenv("LOOKFAST_CPU_ISA", raising=False)
        assert _kernel(torch.bfloat16, 32) != "baseline"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@needs_cpp
def test_kernel_choice_follows_the_cpu_and_the_switch(monkeypatch):
    # The documented rule (docs/ops.md, csrc/cpu/varlen_attention_isa.cpp), checked against /proc/cpuinfo.
    flags = _cpu_flags()
    amx, dot = " amx_bf16" in flags, " avx512_bf16" in flags
    monkeypatch.delenv("LOOKFAST_CPU_ISA", raising=False)
    for dtype in (torch.float32, torch.float64):
        assert _kernel(dtype, 64) == "baseline" and _kernel(dtype, 64, True) == "baseline"
    auto = _kernel(torch.bfloat16, 64)
    onednn = torch.backends.mkldnn.is_available()
    if flags:
        # forward: brgemm with AMX, and on AVX512-BF16 without AMX (measured faster there on Zen 5; isa.cpp's note)
        assert auto == ("brgemm" if (amx or dot) and onednn else "avx512bf16" if dot else "baseline")
    assert _kernel(torch.bfloat16, 8) == "baseline"  # narrow heads: the portable kernel is the faster one
    if flags:  # fp16: brgemm with AMX-FP16 only (AVX512-FP16's micro-kernel measured slower than the portable one)
        amx_fp16 = " amx_fp16" in flags and torch.backends.mkldnn.is_available()
        assert _kernel(torch.float16, 64) == _kernel(torch.float16, 64, True) == ("brgemm" if amx_fp16 else "baseline")
    if flags:  # backward: brgemm with AMX; the hand-written kernel on AVX512-BF16 without AMX (measured faster)
        assert _kernel(torch.bfloat16, 64, True) == ("brgemm" if amx and onednn else "avx512bf16" if dot else "baseline")
    monkeypatch.setenv("LOOKFAST_CPU_ISA", "baseline")
    assert _kernel(torch.bfloat16, 64) == _kernel(torch.bfloat16, 64, True) == _kernel(torch.float16, 64) == "baseline"
    monkeypatch.setenv("LOOKFAST_CPU_ISA", "brgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forced = _kernel(torch.bfloat16, 8)
    if dot or amx:  # torch's oneDNN has a bf16 micro-kernel on both; forced, brgemm runs every head dim
        assert forced == "brgemm" == _kernel(torch.bfloat16, 64) == _kernel(torch.bfloat16, 8, True)
    if " avx512_fp16" in flags or " amx_fp16" in flags:  # and an fp16 one (row-major B without AMX-FP16)
        assert _kernel(torch.float16, 64) == _kernel(torch.float16, 64, True) == "brgemm"


@needs_cpp
def test_forcing_a_missing_kernel_warns_once_and_runs_the_automatic_choice():
    # In a fresh process (the warning is once per process): an unknown value and a kernel this CPU / dtype lacks
    # both fall back to the automatic choice with a warning, never an error.
    # The warning reaches Python's warnings or, where torch's dispatcher has no Python handler installed, stderr
    # (c10's handler): both are collected, and each message must appear exactly once over two calls.
    script = """
import os, warnings
import torch, lookfast
warnings.simplefilter("always")
q = torch.randn(9, 2, 32).half(); cu = torch.tensor([0, 4, 9], dtype=torch.int32)
os.environ["LOOKFAST_CPU_ISA"] = "auto"
auto = {d: torch.ops.lookfast_cpu.varlen_attention_kernel(d, 32) for d in (torch.float16, torch.bfloat16)}
want = lookfast.varlen_attention(q, q, q, cu, cu, 5, 5)
fell_back = []
with warnings.catch_warnings(record=True) as caught:
    for value, dtype in (("fastest", torch.float16), ("avx512bf16", torch.float16), ("brgemm", torch.float16)):
        os.environ["LOOKFAST_CPU_ISA"] = value
        for _ in range(2):
            kernel = torch.ops.lookfast_cpu.varlen_attention_kernel(dtype, 32)
            out = lookfast.varlen_attention(q, q, q, cu, cu, 5, 5)
        if kernel != value:
            assert kernel == auto[dtype], (value, kernel, auto)
            assert torch.equal(out, want)
            fell_back.append(value)
for w in caught:
    print("WARNING", w.message)
print("FELL_BACK", ",".join(fell_back))
print("ok")
"""
    env = dict(os.environ)
    env.pop("LOOKFAST_CPU_ISA", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    fell_back = [line for line in proc.stdout.splitlines() if line.startswith("FELL_BACK")][0].split(" ", 1)[1]
    assert "fastest" in fell_back  # an unknown value never selects a kernel
    said = proc.stdout + proc.stderr
    for value in filter(None, fell_back.split(",")):
        assert said.count(f"LOOKFAST_CPU_ISA={value} is not one") + said.count(f"LOOKFAST_CPU_ISA={value}, but") == 1, said


@needs_cpp
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("dh, dv", [(9, 6), (64, 32), (33, 17)])
def test_lowp_outputs_fully_written_over_poisoned_memory(seed, isa, dtype, dh, dv):
    check_outputs_fully_written([3, 0, 18, 40], [5, 2, 0, 1], 4, 2, dh, dv, dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", LOWP)
def test_lowp_non_contiguous_inputs(seed, isa, dtype):
    lens = [11, 0, 26]
    cu = _cu(lens)
    qkv = torch.randn(int(cu[-1]), 3, 4, 20).to(dtype)
    q, k, v = qkv[:, 0], qkv[:, 1, :2], qkv[:, 2, :2, :7]
    out = lookfast.varlen_attention(q, k, v, cu, cu, 26, 26, causal=True)
    truth = _torch_math(q, k, v, cu, cu, 20**-0.5, True, torch.float64)
    peer = _torch_math(q, k, v, cu, cu, 20**-0.5, True, dtype)
    assert _err(out, truth) <= 2 * _err(peer, truth) + 1e-3


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_lowp_nan_propagates_like_torch_math(seed, isa, dtype):
    # Two samples, 2 heads on 1 kv head. Sample 0: a NaN in key 5, so every query that sees key 5 is NaN in both
    # heads (causal: only rows i >= 5 - (Lk - Lq)). Sample 1: a NaN in query row 2 of head 0: only that row and head.
    # The pattern is torch's attention math in float64 (SDPA's own CPU flash kernel drops some NaN query rows).
    q, k, v, cu_q, cu_k, mq, mk = _make([9, 6], [12, 5], 2, 1, 32, 32, dtype)
    k[5, 0, 7] = float("nan")
    q[9 + 2, 0, 3] = float("nan")
    for causal in (False, True):
        out = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal)
        ref = _torch_math(q, k, v, cu_q, cu_k, 32**-0.5, causal, torch.float64)
        nan_rows = torch.isnan(ref).any(-1)
        assert torch.equal(torch.isnan(out).any(-1), nan_rows)
        assert nan_rows[11, 0] and not nan_rows[11, 1] and nan_rows[:9].any() and not nan_rows[9:].all()
        assert not torch.isnan(out[~nan_rows]).any()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_lowp_only_minus_inf_scores_give_nan_out_and_minus_inf_lse(seed, isa, dtype):
    # A query whose every score is -inf (q holds -inf where each key is positive): out NaN as softmax, lse -inf as
    # logsumexp (float64 truth), on every kernel; the other queries and heads are untouched. Found by the property
    # test: both matrix-engine kernels wrote lse NaN there (3 Dec).
    q, k, v, cu_q, cu_k, mq, mk = _make([5, 3], [7, 4], 2, 1, 32, 32, dtype)
    k[:7, 0, 4] = k[:7, 0, 4].abs() + 1  # sample 0's keys all positive in dim 4
    q[2, 1, 4] = float("-inf")  # query 2 of sample 0, head 1: every score -inf
    out, lse = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, return_lse=True)
    truth = torch.logsumexp(torch.einsum("d,kd->k", q[2, 1].double(), k[:7, 0].double()) * 32**-0.5, 0)
    assert truth.item() == -math.inf and lse[1, 2].item() == -math.inf
    assert torch.isnan(out[2, 1]).all()
    nan_rows = torch.isnan(out).any(-1)
    nan_rows[2, 1] = False
    assert not nan_rows.any() and torch.isfinite(torch.cat([lse[0], lse[1, :2], lse[1, 3:]])).all()


# --------------------------------------------------------------------------------------------- float64 and float32
@needs_cpp
@pytest.mark.parametrize("causal", [False, True])
def test_float64_gradients_match_float64_math_to_1e12(seed, causal):
    lens_q, lens_k, h, hk, dh, dv = CASES[0]
    q, k, v, cu_q, cu_k, mq, mk = _make(lens_q, lens_k, h, hk, dh, dv, torch.float64, std=2.0)
    dout = torch.randn(q.shape[0], h, dv, dtype=torch.float64)
    ours = _grads(lambda a, b, c: lookfast.varlen_attention(a, b, c, cu_q, cu_k, mq, mk, None, causal), q, k, v, dout)
    truth = _grads(lambda a, b, c: _torch_math(a, b, c, cu_q, cu_k, dh**-0.5, causal, torch.float64), q, k, v, dout)
    for o, t in zip(ours, truth):
        assert _err(o, t) <= 1e-12 * max(1.0, t.abs().max().item())


@needs_cpp
@pytest.mark.parametrize("std", [0.5, 1.0])
def test_float32_gradients_within_3x_of_torch_float32_math(seed, std):
    # MQA, 512 queries and 256 keys per sample, near-uniform attention (small scores): the case where dk/dv were
    # 4-6x torch's float32 error when P was recomputed from the float32 lse.
    lens_q, lens_k, h, hk, dh, dv = [512, 512], [256, 256], 4, 1, 64, 64
    q, k, v, cu_q, cu_k, mq, mk = _make(lens_q, lens_k, h, hk, dh, dv, torch.float32, std=std)
    dout = torch.randn(q.shape[0], h, dv)
    ours = _grads(lambda a, b, c: lookfast.varlen_attention(a, b, c, cu_q, cu_k, mq, mk), q, k, v, dout)
    peer = _grads(lambda a, b, c: _torch_math(a, b, c, cu_q, cu_k, dh**-0.5, False, torch.float32), q, k, v, dout)
    truth = _grads(lambda a, b, c: _torch_math(a, b, c, cu_q, cu_k, dh**-0.5, False, torch.float64), q, k, v, dout)
    # The backward's contract. (The float32 forward is 1.5-2.5x torch's float32 error here, from the exp2
    # polynomial's ~2e-7 relative error; it is held to the 1e-5 tolerance of tests/test_varlen_attention.py.)
    for name, o, p, t in zip(("dq", "dk", "dv"), ours[1:], peer[1:], truth[1:]):
        assert _err(o, t) <= 3.0 * _err(p, t), f"{name}: {_err(o, t):.3g} vs torch float32 {_err(p, t):.3g}"


# --------------------------------------------------------------------------------------------- autocast, opcheck, compile
@needs_cpp
def test_autocast_runs_in_the_autocast_dtype_like_sdpa(seed):
    q, k, v, cu_q, cu_k, mq, mk = _make([6, 13], [9, 2], 4, 2, 16, 8, torch.float32)
    with pytest.raises(TypeError, match="k has dtype torch.bfloat16 but q has torch.float32"):
        lookfast.varlen_attention(q, k.bfloat16(), v, cu_q, cu_k, mq, mk)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = lookfast.varlen_attention(q, k.bfloat16(), v, cu_q, cu_k, mq, mk, causal=True)
        direct, lse = torch.ops.lookfast.varlen_attention_fwd(q, k, v.bfloat16(), cu_q, cu_k, mq, mk, 0.25, True)
        sdpa = F.scaled_dot_product_attention(q[:6].transpose(0, 1), k[:9].transpose(0, 1).repeat_interleave(2, 0),
                                              v[:9].transpose(0, 1).repeat_interleave(2, 0))
    assert sdpa.dtype == torch.bfloat16  # the behaviour copied
    want = lookfast.varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu_q, cu_k, mq, mk, causal=True)
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, want)
    assert direct.dtype == torch.bfloat16 and lse.dtype == torch.float32 and torch.equal(direct, want)
    # float64 is not an autocast type: it stays float64, as SDPA leaves it.
    with torch.autocast("cpu", torch.bfloat16):
        d = lookfast.varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk)
    assert d.dtype == torch.float64


@needs_cpp
def test_autocast_cross_attention_and_backward(seed):
    q = torch.randn(2, 7, 4, 16, requires_grad=True)
    k = torch.randn(2, 5, 2, 16, requires_grad=True)
    v = torch.randn(2, 5, 2, 16, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out = lookfast.cross_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    want = lookfast.cross_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.equal(out, want)


@needs_cpp
@pytest.mark.parametrize("dh", [8, 32])
def test_opcheck_bfloat16(seed, isa, dh):
    q, k, v, cu_q, cu_k, mq, mk = _make([5, 0, 40], [4, 3, 21], 4, 2, dh, 6, torch.bfloat16)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lookfast.varlen_attention_fwd, (q, k, v, cu_q, cu_k, mq, mk, 0.35, True))
    out, lse = torch.ops.lookfast.varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, 0.35, False)
    torch.library.opcheck(
        torch.ops.lookfast.varlen_attention_bwd,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k, mq, mk, 0.35, False),
    )


@needs_cpp
def test_torch_compile_fullgraph_bfloat16_and_autocast(seed):
    q, k, v, cu_q, cu_k, mq, mk = _make([6, 13], [9, 2], 2, 1, 16, 16, torch.float32)

    def layer(q, k, v):
        return lookfast.varlen_attention(q * 2.0, k, v, cu_q, cu_k, mq, mk, causal=True).relu()

    def autocast_layer(q, k, v):
        with torch.autocast("cpu", torch.bfloat16):
            return layer(q, k, v)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    qb, kb, vb = q.bfloat16().requires_grad_(), k.bfloat16(), v.bfloat16()
    out = compiled(qb, kb, vb)
    assert out.dtype == torch.bfloat16 and torch.equal(out, layer(qb, kb, vb))
    out.float().sum().backward()
    assert qb.grad is not None and torch.isfinite(qb.grad).all()
    torch._dynamo.reset()
    compiled_ac = torch.compile(autocast_layer, fullgraph=True, backend="aot_eager")
    out = compiled_ac(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.equal(out, autocast_layer(q, k, v))
