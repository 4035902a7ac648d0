"""Triton varlen attention kernels (forward, lse, backward) under the interpreter vs a float64 per-sample reference,
plus ahead-of-time compilation for sm_80 / sm_90 (no spills) and GPU-only runs of the real ops."""
import math

import pytest
import torch

from lookfast.kernels import varlen_attention as vk
from oracles import rel_err, within_flash_rule
from oracles import varlen_attention as varlen_attention_f64

SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)  # many blocks per sample on short sequences


def make_case(lens_q, lens_k, heads, kv_heads, dk, dv, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, heads, dk, generator=gen).to(dtype)
    k = torch.randn(tk, kv_heads, dk, generator=gen).to(dtype)
    v = torch.randn(tk, kv_heads, dv, generator=gen).to(dtype)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, k, v, cu_q, cu_k


TOL = {torch.float32: 1e-5, torch.float16: 1e-2}

# (lens_q, lens_k, heads, kv_heads, dk, dv, causal): ragged incl. 0 and 1, GQA, Lq > Lk and Lq < Lk, odd head dims
CASES = [
    ([5, 0, 1, 37, 20], [9, 3, 0, 33, 50], 2, 1, 24, 24, False),
    ([5, 0, 1, 37, 20], [9, 3, 0, 33, 50], 2, 1, 24, 24, True),
    ([40, 3, 17], [12, 30, 17], 4, 2, 8, 8, True),
    ([1, 23, 6], [35, 7, 6], 3, 3, 20, 12, False),
    ([30, 2], [16, 49], 1, 1, 32, 8, True),
]


def _forward_and_truth(q, k, v, cu_q, cu_k, lens_q, lens_k, scale, causal):
    """The Triton forward into NaN-poisoned outputs, and the float64 truth on leaf copies of q, k, v (for gradients)."""
    heads, dv = q.shape[1], v.shape[2]
    out = torch.full((q.shape[0], heads, dv), float("nan"), dtype=q.dtype)
    lse = torch.full((heads, q.shape[0]), float("nan"), dtype=torch.float32)
    vk.varlen_attention_fwd_triton(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), scale, causal,
                                   out=out, lse=lse, _config=SMALL)
    leaves = tuple(t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = varlen_attention_f64(*leaves, cu_q, cu_k, scale, causal)
    return out, lse, leaves, ref_out, ref_lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_backward(case, dtype, seed):
    lens_q, lens_k, heads, kv_heads, dk, dv, causal = CASES[case]
    q, k, v, cu_q, cu_k = make_case(lens_q, lens_k, heads, kv_heads, dk, dv, dtype, seed)
    scale = 1.0 / math.sqrt(dk) * 1.3
    out, lse, (qr, kr, vr), ref_out, ref_lse = _forward_and_truth(q, k, v, cu_q, cu_k, lens_q, lens_k, scale, causal)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert rel_err(lse, ref_lse) <= TOL[dtype]

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    dq, dk_, dv_ = vk.varlen_attention_bwd_triton(dout, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k),
                                                  scale, causal, _config=SMALL)
    gq, gk, gv = torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())
    for got, want in ((dq, gq), (dk_, gk), (dv_, gv)):
        assert got.dtype == dtype and got.shape == want.shape
        assert not got.isnan().any()
        assert rel_err(got, want) <= 2 * TOL[dtype]


def reference_lowp(q, k, v, cu_q, cu_k, scale, causal):
    """Plain PyTorch attention computed in q's own (low) precision: the per-sample math of `reference` with bf16/fp16
    matmuls and softmax, as a user writing it in torch would get. Its error against the float64 truth is the yardstick
    of the accuracy rule."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    outs = []
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = qe - qs, ke - ks
        qb = q[qs:qe].transpose(0, 1)
        kb = k[ks:ke].transpose(0, 1).repeat_interleave(group, dim=0)
        vb = v[ks:ke].transpose(0, 1).repeat_interleave(group, dim=0)
        s = qb @ kb.transpose(1, 2) * scale
        mask = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no visible key is all -inf: 0, as the kernels
        outs.append((p @ vb).transpose(0, 1))
    return torch.cat(outs, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_low_precision_within_flash_rule(case, dtype, seed):
    # bf16/fp16 operands go to tl.dot in their own dtype (tensor cores on a GPU; the interpreter emulates the dot with
    # exact products and fp32 sums, tests/conftest.py), softmax statistics in fp32, outputs rounded once: error vs
    # float64 at most 2x (forward) / 3x (gradients) the error of plain PyTorch in the same dtype.
    lens_q, lens_k, heads, kv_heads, dk, dv, causal = CASES[case]
    q, k, v, cu_q, cu_k = make_case(lens_q, lens_k, heads, kv_heads, dk, dv, dtype, seed)
    scale = 1.0 / math.sqrt(dk)
    out, lse, (qr, kr, vr), ref_out, ref_lse = _forward_and_truth(q, k, v, cu_q, cu_k, lens_q, lens_k, scale, causal)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    low_out = reference_lowp(ql, kl, vl, cu_q, cu_k, scale, causal)
    assert out.dtype == dtype and not out.isnan().any()
    within_flash_rule(out, low_out, ref_out, 2)
    assert rel_err(lse, ref_lse) <= 1e-3  # fp32 statistics of low-precision scores

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got = vk.varlen_attention_bwd_triton(dout, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k), scale,
                                         causal, _config=SMALL)
    truth = torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())
    low = torch.autograd.grad(low_out, (ql, kl, vl), dout)
    for g, lo, t in zip(got, low, truth):
        assert g.dtype == dtype and not g.isnan().any()
        within_flash_rule(g, lo, t, 3)


def test_interpreter_runs_bf16_dots_exactly_and_rounds_to_nearest():
    # the emulation the low-precision tests rely on: a bf16 dot gives exactly the fp32 sum of exact products
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(A, B, C):
        r = tl.arange(0, 16)
        a = tl.load(A + r[:, None] * 16 + r[None, :])
        b = tl.load(B + r[:, None] * 16 + r[None, :])
        tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, b))

    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    dot_kernel[(1,)](a, b, c)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-6)

    # and an fp32 -> bf16 cast rounds to nearest even, as a GPU's cvt.rn.bf16.f32 (not toward zero)
    @triton.jit
    def cast_kernel(X, Y):
        r = tl.arange(0, 256)
        tl.store(Y + r, tl.load(X + r).to(tl.bfloat16))

    x = torch.randn(256) * 10
    x[:4] = torch.tensor([1.005859375, -1.005859375, 1.001953125, float("nan")])  # +-0.75 ulp, 0.25 ulp, NaN
    y = torch.empty(256, dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y)
    assert torch.equal(y[:3].float(), torch.tensor([1.0078125, -1.0078125, 1.0])) and y[3].isnan()
    assert torch.equal(y[4:], x[4:].bfloat16())


def test_default_config_and_max_seqlen_too_small(seed):
    # default block sizes (one block per sample here) and a max_seqlen_q smaller than the real one: the kernels'
    # grid-stride loops must still cover every query
    lens_q, lens_k = [70, 3], [9, 66]
    q, k, v, cu_q, cu_k = make_case(lens_q, lens_k, 2, 2, 16, 16, torch.float32, seed)
    out, lse = vk.varlen_attention_fwd_triton(q, k, v, cu_q, cu_k, 10, 10, 0.25, True)
    ref_out, ref_lse = varlen_attention_f64(q, k, v, cu_q, cu_k, 0.25, True)
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-5


def test_strided_views_of_packed_qkv(seed):
    # q, k, v as views of one (tokens, 3, H, D) tensor: token strides 3*H*D, not contiguous; launchers use the strides
    lens = [9, 0, 21]
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lens), 3, 2, 24, generator=gen)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not q.is_contiguous()
    cu = torch.tensor([0, 9, 9, 30], dtype=torch.int32)
    out, lse = vk.varlen_attention_fwd_triton(q, k, v, cu, cu, 21, 21, 0.2, True, _config=SMALL)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = varlen_attention_f64(qr, kr, vr, cu, cu, 0.2, True)
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-5
    dout = torch.randn(30, 4, 24, generator=gen)[:, ::2]  # non-contiguous gradient too
    got = vk.varlen_attention_bwd_triton(dout, q, k, v, out, lse, cu, cu, 21, 21, 0.2, True, _config=SMALL)
    for g, w in zip(got, torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())):
        assert rel_err(g, w) <= 2e-5


def test_empty_inputs():
    q, k, v, cu_q, cu_k = make_case([0, 0], [3, 0], 2, 1, 8, 8, torch.float32, 0)
    out, lse = vk.varlen_attention_fwd_triton(q, k, v, cu_q, cu_k, 0, 3, 0.5, False)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    dq, dk, dv = vk.varlen_attention_bwd_triton(out, q, k, v, out, lse, cu_q, cu_k, 0, 3, 0.5, False)
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def test_head_dim_limit():
    q, k, v, cu_q, cu_k = make_case([2], [2], 1, 1, 300, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="head dims"):
        vk.varlen_attention_fwd_triton(q, k, v, cu_q, cu_k, 2, 2, 0.5, False)



def test_triton_ops_registration(seed):
    """lookfast::varlen_attention_fwd_triton / _bwd_triton (what CUDA tensors run with Triton) under the interpreter:
    schema, fake kernels and autograd registration, as the library ops."""
    q, k, v, cu_q, cu_k = make_case([3, 0, 5], [4, 2, 1], 2, 1, 8, 8, torch.float32, seed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, cu_q, cu_k, 5, 4, 0.3, True)
    torch.library.opcheck(torch.ops.lookfast.varlen_attention_fwd_triton, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = torch.ops.lookfast.varlen_attention_fwd_triton(*args)
    torch.library.opcheck(torch.ops.lookfast.varlen_attention_bwd_triton,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k, 5,
                           4, 0.3, True), test_utils=("test_schema", "test_faketensor"))

# ---------------------------------------------------- the CUDA kernel's softmax steps and the shared mask rule, on the host

_HEADER_CHECK = r"""
#include <cstdio>
#include "common/varlen_attention.h"
#include "cuda/online_softmax.cuh"
namespace osm = lookfast::online_softmax;
using lookfast::varlen::causal_key_end;
int main() {
  // one query, scores in blocks of 3 (the first block fully masked), values v_j = j; causal bound 7 of 9 keys
  const double s[9] = {-1e300, -1e300, -1e300, 0.5, 2.0, -1.0, 3.0, 0.25, 9.0};
  const long lk = 9, lq = 4, i = 1;
  const long visible = causal_key_end(i, lq, lk, true);  // i + lk - lq + 1 = 7
  double m = osm::neg_inf<double>(), l = 0, acc = 0;
  for (int j0 = 0; j0 < 9; j0 += 3) {
    double sc[3], cmax = osm::neg_inf<double>();
    for (int c = 0; c < 3; ++c) {
      const int j = j0 + c;
      sc[c] = (j >= 3 && j < visible) ? s[j] : osm::neg_inf<double>();
      cmax = cmax > sc[c] ? cmax : sc[c];
    }
    const double m_new = m > cmax ? m : cmax;
    if (m_new == osm::neg_inf<double>()) continue;
    const double alpha = osm::rescale(m, m_new);
    l *= alpha; acc *= alpha;
    for (int c = 0; c < 3; ++c) { const double p = osm::weight(sc[c], m_new); l += p; acc += p * (j0 + c); }
    m = m_new;
  }
  std::printf("%ld %.17g %.17g %.17g %.17g %ld %ld %.17g %.17g\n", visible, acc * osm::inv_sum(l, true),
              osm::log_sum_exp(m, l), osm::log_sum_exp(osm::neg_inf<double>(), 0.0), osm::inv_sum(0.0, false),
              causal_key_end(0, 9, 3, true), causal_key_end(5, 2, 3, false), osm::inv_sum(0.0, true),
              osm::log_sum_exp(1.0, std::numeric_limits<double>::quiet_NaN()));
}
"""


def test_online_softmax_header_on_host(tmp_path):
    import os
    import shutil
    import subprocess

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    src, exe = tmp_path / "check.cpp", tmp_path / "check"
    src.write_text(_HEADER_CHECK)
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{csrc}", str(src), "-o", str(exe)], check=True)
    fields = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    scores = torch.tensor([0.5, 2.0, -1.0, 3.0], dtype=torch.float64)  # keys 3..6
    p = torch.softmax(scores, 0)
    assert int(fields[0]) == 7
    assert float(fields[1]) == pytest.approx((p * torch.arange(3, 7, dtype=torch.float64)).sum().item(), rel=1e-14)
    assert float(fields[2]) == pytest.approx(torch.logsumexp(scores, 0).item(), rel=1e-14)
    assert fields[3] == "-inf" and float(fields[4]) == 0.0
    assert int(fields[5]) == 0 and int(fields[6]) == 3
    # keys seen whose scores were all -inf: NaN (softmax's 0 / 0); a NaN sum gives a NaN lse (torch.logsumexp)
    assert math.isnan(float(fields[7])) and math.isnan(float(fields[8]))


# ---------------------------------------------------------------- ahead-of-time compilation for real GPUs

def _aot_cases():
    cases = []
    for dtype, tname in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for d in (64, 8):
            f, bw = vk.fwd_config(d, d, dtype), vk.bwd_config(d, d, dtype)
            bd = vk._pad_dim(d)
            common = dict(CAUSAL=True, IEEE=dtype == torch.float32, BLOCK_DK=bd, BLOCK_DV=bd, DK=d, DV=d)
            ptr, i32 = f"*{tname}", "i32"
            fwd_sig = dict(Q=ptr, K=ptr, V=ptr, Out=ptr, Lse="*fp32", cu_q="*i32", cu_k="*i32",
                           **{n: i32 for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                               "stride_vh", "stride_ot", "stride_oh", "total_q", "group")},
                           qk_scale_log2="fp32")
            cases.append(("_varlen_fwd_kernel", fwd_sig,
                          dict(common, BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"]), f, f"fwd-{tname}-d{d}"))
            bwd_strides = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                           "stride_dot", "stride_doh")
            dkdv_sig = dict(Q=ptr, K=ptr, V=ptr, dOut=ptr, Lse="*fp32", Delta="*fp32", dK=ptr, dV=ptr,
                            cu_q="*i32", cu_k="*i32",
                            **{n: i32 for n in bwd_strides + ("stride_dkt", "stride_dkh", "stride_dvt", "stride_dvh",
                                                              "total_q", "group")},
                            sm_scale="fp32")
            dq_sig = dict(Q=ptr, K=ptr, V=ptr, dOut=ptr, Lse="*fp32", Delta="*fp32", dQ=ptr, cu_q="*i32",
                          cu_k="*i32", **{n: i32 for n in bwd_strides + ("stride_dqt", "stride_dqh", "total_q",
                                                                         "group")},
                          sm_scale="fp32")
            bconst = dict(common, BLOCK_M=bw["BLOCK_M"], BLOCK_N=bw["BLOCK_N"])
            dkdv_launch = dict(bw, num_warps=bw["dkdv_num_warps"])
            cases.append(("_varlen_bwd_dkdv_kernel", dkdv_sig, bconst, dkdv_launch, f"dkdv-{tname}-d{d}"))
            cases.append(("_varlen_bwd_dq_kernel", dq_sig, bconst, bw, f"dq-{tname}-d{d}"))
            delta_sig = dict(Out=ptr, dOut=ptr, Delta="*fp32",
                             **{n: i32 for n in ("stride_ot", "stride_oh", "stride_dot", "stride_doh", "total_q", "H")})
            cases.append(("_varlen_bwd_delta_kernel", delta_sig, dict(BLOCK_M=64, BLOCK_DV=bd, DV=d),
                          dict(num_warps=4, num_stages=1), f"delta-{tname}-d{d}"))
    return cases


AOT = _aot_cases()

@pytest.fixture(scope="module")
def aot_reports():
    """Every kernel x config x arch compiled in ONE subprocess (one triton import; tests/triton_aot.compile_reports).
    Pointers and strides are declared 16-divisible, as the JIT specialises them for aligned tensors (Dh 64 / 8)."""
    from triton_aot import compile_reports

    jobs, keys = [], []
    for kernel, signature, constexprs, launch, name in AOT:
        sig = dict(signature, **{n: "constexpr" for n in constexprs})
        aligned = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride")]
        for arch in (80, 90):
            keys.append((name, arch))
            jobs.append(dict(module="lookfast.kernels.varlen_attention", kernel=kernel, signature=sig,
                             constexprs=constexprs, arch=arch, num_warps=launch["num_warps"],
                             num_stages=launch["num_stages"], divisible=aligned))
    reports = {}
    for key, res in zip(keys, compile_reports(jobs)):
        failed = "error" in res
        reports[key] = dict(ok=not failed, registers=res.get("registers", 0), spill_stores=res.get("spill_stores", 0),
                            spill_loads=res.get("spill_loads", 0), shared=res.get("shared", 0),
                            tensor_core=res.get("tensor_core", 0),
                            ptxas=res["error"] if failed else res["ptxas"])
    return reports


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", [c[4] for c in AOT])
def test_aot_compiles_without_spills(aot_reports, name, arch):
    report = aot_reports[name, arch]
    print(name, arch, {key: report[key] for key in ("registers", "spill_stores", "spill_loads", "shared", "tensor_core")})
    assert report["ok"], report["ptxas"]
    assert report["registers"] > 0
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["ptxas"]
    if not name.startswith("delta"):
        # bf16/fp16 dots on tensor cores (mma.sync / wgmma); fp32 keeps exact (ieee) FMA products
        low = "-fp16-" in name or "-bf16-" in name
        assert (report["tensor_core"] > 0) == low, report["tensor_core"]


# ---------------------------------------------------------------- real GPU

def _gpu_case(width, dtype, causal, seed):
    # ragged with 0 and 1, GQA, Lq > Lk and Lq < Lk, multi-tile sequences; width 8 is the Dyn-Perceiver z->x path
    lens_q, lens_k = [5, 0, 1, 300, 129, 3136], [170, 3, 0, 300, 64, 64]
    q, k, v, cu_q, cu_k = make_case(lens_q, lens_k, 4, 2, width, width, dtype, seed)
    scale = 1.0 / math.sqrt(width)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = varlen_attention_f64(qr, kr, vr, cu_q, cu_k, scale, causal)
    dout = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())
    dev = [t.cuda() for t in (q, k, v, cu_q, cu_k)]
    return dev, dout.cuda(), (max(lens_q), max(lens_k), scale, causal), ref_out.detach(), ref_lse, grads


GPU_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("width", [64, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_on_gpu(width, dtype, causal, seed):
    dev, dout, args, ref_out, ref_lse, grads = _gpu_case(width, dtype, causal, seed)
    tol = GPU_TOL[dtype]
    out, lse = vk.varlen_attention_fwd_triton(*dev, *args)
    assert rel_err(out.cpu(), ref_out) <= tol and rel_err(lse.cpu(), ref_lse) <= tol
    got = vk.varlen_attention_bwd_triton(dout, *dev[:3], out, lse, *dev[3:], *args)
    for g, w in zip(got, grads):
        assert rel_err(g.cpu(), w) <= 2 * tol


@pytest.mark.gpu
@pytest.mark.parametrize("width", [64, 8, 98])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_op_on_gpu(width, dtype, causal, seed):
    import lookfast  # noqa: F401  (loads the extension and its schemas)

    if not torch._C._dispatch_has_kernel_for_dispatch_key("lookfast::varlen_attention_fwd", "CUDA"):
        pytest.fail("the CUDA kernels of varlen_attention are not built into this lookfast")
    dev, dout, args, ref_out, ref_lse, grads = _gpu_case(width, dtype, causal, seed)
    tol = GPU_TOL[dtype]
    out, lse = torch.ops.lookfast.varlen_attention_fwd(*dev, *args)
    assert rel_err(out.cpu(), ref_out) <= tol and rel_err(lse.cpu(), ref_lse) <= 1e-5
    got = torch.ops.lookfast.varlen_attention_bwd(dout, *dev[:3], out, lse, *dev[3:], *args)
    for g, w in zip(got, grads):
        assert g.dtype == dtype and rel_err(g.cpu(), w) <= 2 * tol
