"""lookfast.varlen_attention / cross_attention: reference vs float64 math, C++ CPU kernels vs the reference (forward,
lse, gradients), the models' shapes at reduced size, opcheck, torch.compile, and every bad input refused by name."""
import math

import pytest
import torch
import torch.nn.functional as F

import lookfast
from lookfast import _backend
from lookfast.ops.varlen_attention import varlen_attention_reference
from oracles import rel_err
from oracles import varlen_attention as varlen_attention_f64

from varlen_inputs import cu_seqlens as _cu
from varlen_inputs import check_outputs_fully_written
from varlen_inputs import make_varlen as _make

needs_cpp = pytest.mark.skipif(not _backend.has_kernel("varlen_attention_fwd", "CPU"), reason="C++ kernel not built")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _assert_lse(lse, ref):
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref.float()))
    finite = torch.isfinite(ref)
    if finite.any():
        assert (lse[finite].double() - ref[finite].double()).abs().max().item() <= 1e-5 * max(1.0, ref[finite].abs().max().item())


RAGGED = [
    # lens_q, lens_k, H, Hk, Dh, Dv
    ([5, 0, 17, 1, 40, 3], [7, 3, 0, 1, 300, 9], 6, 2, 13, 9),  # zero queries, zero keys, single rows, long keys
    ([1, 33, 0], [29, 1, 4], 6, 3, 24, 17),
    ([19, 2, 7], [6, 6, 21], 6, 1, 40, 40),
    ([0, 0], [0, 5], 6, 6, 8, 5),
]


def test_public_api_on_every_backend(backend, seed):
    """One body, every backend (conftest `backend`): forward, lse and gradients of varlen_attention (ragged with
    empty samples, GQA, both causal alignments) and cross_attention, against the float64 oracle."""
    dev = backend.device
    q, k, v, cu_q, cu_k, mq, mk = _make([5, 0, 1, 9], [7, 3, 0, 4], 4, 2, 12, 8)
    for causal in (False, True):
        leaves = [t.to(dev).requires_grad_() for t in (q, k, v)]
        out, lse = lookfast.varlen_attention(*leaves, cu_q.to(dev), cu_k.to(dev), mq, mk, causal=causal,
                                             return_lse=True)
        assert backend.ran("varlen_attention_fwd")
        grad = torch.randn(out.shape)
        got = torch.autograd.grad(out, leaves, grad.to(dev))
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = varlen_attention_f64(*ref_leaves, cu_q, cu_k, 12**-0.5, causal)
        want = torch.autograd.grad(ref_out, ref_leaves, grad.double())
        assert rel_err(out.cpu(), ref_out) <= 1e-5
        _assert_lse(lse.cpu(), ref_lse)
        for g, w in zip(got, want):
            assert rel_err(g.cpu(), w) <= 2e-5
    qb, kb = torch.randn(3, 6, 2, 8), torch.randn(3, 5, 1, 8)
    lengths = torch.tensor([5, 0, 2])
    out = lookfast.cross_attention(qb.to(dev), kb.to(dev), kb.to(dev), kv_lengths=lengths.to(dev))
    assert backend.ran("varlen_attention_fwd")
    cu_k = _cu(lengths.tolist())
    keep = (torch.arange(5)[None, :] < lengths[:, None]).reshape(-1)
    packed_k = kb.reshape(15, 1, 8)[keep]
    ref, _ = varlen_attention_f64(qb.reshape(18, 2, 8), packed_k, packed_k, _cu([6, 6, 6]), cu_k, 8**-0.5, False)
    assert rel_err(out.cpu(), ref.reshape(3, 6, 2, 8)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softmax_special_values_on_every_backend(backend, dtype):
    """Softmax's semantics on every backend: a query whose visible scores are all -inf (q holds -inf where every key
    of its sample is positive) outputs NaN with lse -inf; a query with a NaN score outputs NaN with lse NaN (as
    torch.logsumexp); a query that sees no key (causal, Lq > Lk) outputs zeros with lse -inf; every other query is
    finite. (Until 4 Dec the CUDA and Triton kernels output zeros for the first and lse -inf for the second: found by
    running the CPU test suite on the CUDA emulator.)"""
    q, k, v, cu_q, cu_k, mq, mk = _make([5, 6], [7, 4], 2, 1, 32, 32, dtype)
    k[:7, 0, 4] = k[:7, 0, 4].abs() + 1  # sample 0's keys all positive in dim 4
    q[2, 1, 4] = float("-inf")  # query 2 of sample 0, head 1: every score -inf
    q[4, 0, 7] = float("nan")  # query 4 of sample 0, head 0: every score NaN
    for causal in (False, True):
        out, lse = lookfast.varlen_attention(*(t.to(backend.device) for t in (q, k, v, cu_q, cu_k)), mq, mk,
                                             causal=causal, return_lse=True)
        assert backend.ran("varlen_attention_fwd")
        out, lse = out.cpu().float(), lse.cpu()
        assert torch.isnan(out[2, 1]).all() and lse[1, 2].item() == -math.inf
        assert torch.isnan(out[4, 0]).all() and math.isnan(lse[0, 4].item())
        blind = [5, 6] if causal else []  # sample 1 (6 queries, 4 keys): its first two queries see no key
        assert (out[blind] == 0).all() and torch.isneginf(lse[:, blind]).all()
        finite = torch.ones(out.shape[:2], dtype=torch.bool)
        finite[2, 1] = finite[4, 0] = False
        finite[blind] = False
        assert torch.isfinite(out[finite]).all() and torch.isfinite(lse.T[finite]).all()


def test_reference_matches_float64_math(seed):
    for lens_q, lens_k, h, hk, dh, dv in RAGGED[:3]:
        for causal in (False, True):
            q, k, v, cu_q, cu_k, _, _ = _make(lens_q, lens_k, h, hk, dh, dv, torch.float64)
            scale = 0.37 if causal else 1 / math.sqrt(dh)
            out, lse = varlen_attention_reference(q, k, v, cu_q, cu_k, scale, causal)
            ref_out, ref_lse = varlen_attention_f64(q, k, v, cu_q, cu_k, scale, causal)
            assert rel_err(out, ref_out) < 1e-12
            _assert_lse(lse, ref_lse)


@needs_cpp
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", range(len(RAGGED)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_forward_matches_reference(seed, case, causal, dtype):
    lens_q, lens_k, h, hk, dh, dv = RAGGED[case]
    q, k, v, cu_q, cu_k, mq, mk = _make(lens_q, lens_k, h, hk, dh, dv, dtype)
    scale = None if case % 2 else 0.21
    out, lse = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, softmax_scale=scale, causal=causal, return_lse=True)
    assert out.dtype == dtype and out.shape == (q.shape[0], h, dv)
    s = scale if scale is not None else 1 / math.sqrt(dh)
    # float64 oracle on the inputs as given (upcast), per the numerical contract.
    ref_out, ref_lse = varlen_attention_f64(q, k, v, cu_q, cu_k, s, causal)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) <= TOL[dtype]
    _assert_lse(lse, ref_lse.double())


@needs_cpp
def test_causal_alignment_both_ways(seed):
    # Lq > Lk (leading queries see nothing: zeros, lse -inf) and Lq < Lk (every query sees a prefix beyond its index).
    q, k, v, cu_q, cu_k, mq, mk = _make([23, 4, 37], [9, 30, 37], 2, 1, 16, 12)
    out, lse = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, return_lse=True)
    ref_out, ref_lse = varlen_attention_f64(q, k, v, cu_q, cu_k, 0.25, True)
    assert rel_err(out, ref_out) <= 1e-5
    _assert_lse(lse, ref_lse)
    assert (out[:14] == 0).all() and torch.isneginf(lse[:, :14]).all()


@needs_cpp
@pytest.mark.parametrize(
    "shape",
    [
        # Dyn-Perceiver z->x (few keys, many queries, width 8), x->z (few queries vs 49 keys), LookWhere self-attention.
        ("z->x", [3136 // 16, 49, 200], [64, 16, 64], 1, 1, 8, 8),
        ("x->z", [128, 16, 128], [49, 49, 49], 1, 1, 32, 32),
        ("lookwhere", [45, 5, 131, 70], [45, 5, 131, 70], 12, 12, 64, 64),
        ("wide", [77, 300], [256, 129], 1, 1, 98, 98),
    ],
    ids=lambda s: s[0],
)
def test_model_shapes_reduced(seed, shape):
    _, lens_q, lens_k, h, hk, dh, dv = shape
    q, k, v, cu_q, cu_k, mq, mk = _make(lens_q, lens_k, h, hk, dh, dv, std=2.0)
    out, lse = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, return_lse=True)
    ref_out, ref_lse = varlen_attention_f64(q, k, v, cu_q, cu_k, dh**-0.5)
    assert rel_err(out, ref_out) <= 1e-5
    _assert_lse(lse, ref_lse.double())


@needs_cpp
def test_non_contiguous_inputs(seed):
    lens = [11, 0, 26]
    cu = _cu(lens)
    qkv = torch.randn(int(cu[-1]), 3, 4, 20)  # a fused projection: q, k, v are strided views
    q, k, v = qkv[:, 0], qkv[:, 1, :2], qkv[:, 2, :2, :7]
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out = lookfast.varlen_attention(q, k, v, cu, cu, 26, 26, causal=True)
    ref, _ = varlen_attention_f64(q, k, v, cu, cu, 20**-0.5, True)
    assert rel_err(out, ref) <= 1e-5


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dh, dv", [(9, 6), (64, 32)])  # (64, 32): bf16 takes the dot-product kernel where the CPU has it
def test_outputs_fully_written_over_poisoned_memory(seed, dtype, dh, dv):
    check_outputs_fully_written([3, 0, 18], [5, 2, 0], 4, 2, dh, dv, dtype)


@needs_cpp
def test_gradcheck_float64(seed):
    for causal in (False, True):
        q, k, v, cu_q, cu_k, mq, mk = _make([3, 0, 5, 1], [4, 2, 3, 0], 4, 2, 5, 3, torch.float64)
        args = [t.requires_grad_() for t in (q, k, v)]
        fn = lambda q, k, v: lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, softmax_scale=0.7, causal=causal)
        assert torch.autograd.gradcheck(fn, args, atol=1e-5, rtol=1e-4)


@needs_cpp
@pytest.mark.parametrize("causal", [False, True])
def test_float32_gradients_match_reference(seed, causal):
    lens_q, lens_k, h, hk, dh, dv = RAGGED[1]
    q, k, v, cu_q, cu_k, mq, mk = _make(lens_q, lens_k, h, hk, dh, dv)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=causal)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = varlen_attention_f64(qd, kd, vd, cu_q, cu_k, dh**-0.5, causal)
    want = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 2e-5


@needs_cpp
def test_bfloat16_gradients(seed):
    q, k, v, cu_q, cu_k, mq, mk = _make([7, 20], [30, 3], 2, 2, 16, 16, torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = varlen_attention_f64(qd, kd, vd, cu_q, cu_k, 0.25, True)
    want = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16 and rel_err(g, w) <= 2e-2


@needs_cpp
def test_lse_is_not_differentiable(seed):
    q, k, v, cu_q, cu_k, mq, mk = _make([4], [6], 1, 1, 8, 8)
    q.requires_grad_()
    out, lse = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


@needs_cpp
def test_opcheck(seed):
    q, k, v, cu_q, cu_k, mq, mk = _make([5, 0, 9], [4, 3, 11], 4, 2, 8, 6)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lookfast.varlen_attention_fwd, (q, k, v, cu_q, cu_k, mq, mk, 0.35, True))
    out, lse = torch.ops.lookfast.varlen_attention_fwd(q, k, v, cu_q, cu_k, mq, mk, 0.35, False)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.lookfast.varlen_attention_bwd,
        (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k, mq, mk, 0.35, False),
    )


@needs_cpp
def test_torch_compile_fullgraph(seed):
    q, k, v, cu_q, cu_k, mq, mk = _make([6, 13], [9, 2], 2, 1, 16, 16)

    def layer(q, k, v):
        return lookfast.varlen_attention(q * 2.0, k, v, cu_q, cu_k, mq, mk, causal=True).relu()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    q.requires_grad_()
    out = compiled(q, k, v)
    assert torch.allclose(out, layer(q, k, v), atol=1e-6)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@needs_cpp
@pytest.mark.parametrize("heads", [(3, 3), (6, 2)])
def test_cross_attention_matches_sdpa(seed, heads):
    h, hk = heads
    q = torch.randn(3, 37, h, 16)
    k = torch.randn(3, 11, hk, 16)
    v = torch.randn(3, 11, hk, 12)
    out = lookfast.cross_attention(q, k, v)
    kk = k.repeat_interleave(h // hk, 2).transpose(1, 2)
    vv = v.repeat_interleave(h // hk, 2).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv).transpose(1, 2)
    assert out.shape == (3, 37, h, 12)
    assert rel_err(out, ref) <= 1e-5
    lengths = torch.tensor([11, 0, 4])
    out = lookfast.cross_attention(q, k, v, kv_lengths=lengths)
    mask = torch.arange(11)[None, :] < lengths[:, None]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask[:, None, None, :]).transpose(1, 2)
    assert (out[1] == 0).all()
    assert rel_err(out[[0, 2]], ref[[0, 2]]) <= 1e-5


def test_reference_backend_forced(seed, monkeypatch):
    monkeypatch.setenv("LOOKFAST_BACKEND", "reference")
    q, k, v, cu_q, cu_k, mq, mk = _make([4, 2], [3, 5], 2, 1, 8, 4)
    out = lookfast.varlen_attention(q, k, v, cu_q, cu_k, mq, mk)
    ref, _ = varlen_attention_f64(q, k, v, cu_q, cu_k, 8**-0.5, False)
    assert rel_err(out, ref) <= 1e-6


def _good():
    q, k, v, cu_q, cu_k, mq, mk = _make([3, 5], [4, 2], 4, 2, 8, 6)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)


BAD = [
    ("q", lambda a: a.update(q=a["q"].numpy()), TypeError),
    ("q", lambda a: a.update(q=a["q"][:, :, None]), ValueError),
    ("k", lambda a: a.update(k=a["k"].double()), TypeError),
    ("q", lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError),
    ("cu_seqlens_q", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError),
    ("cu_seqlens_k", lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][None]), ValueError),
    ("cu_seqlens_q", lambda a: a.update(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError),
    ("cu_seqlens_q", lambda a: a.update(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError),
    ("cu_seqlens_k", lambda a: a.update(cu_seqlens_k=torch.tensor([0, 4, 5], dtype=torch.int32)), ValueError),
    ("cu_seqlens_k", lambda a: a.update(cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32)), ValueError),
    ("max_seqlen_q", lambda a: a.update(max_seqlen_q=4), ValueError),
    ("max_seqlen_k", lambda a: a.update(max_seqlen_k=3.0), TypeError),
    ("heads", lambda a: a.update(k=torch.randn(6, 3, 8), v=torch.randn(6, 3, 6)), ValueError),
    ("head dim", lambda a: a.update(k=torch.randn(6, 2, 7)), ValueError),
    ("v", lambda a: a.update(v=torch.randn(5, 2, 6)), ValueError),
    ("v", lambda a: a.update(v=a["v"].to("meta")), ValueError),
    ("softmax_scale", lambda a: a.update(softmax_scale=float("nan")), ValueError),
    ("softmax_scale", lambda a: a.update(softmax_scale=float("inf")), ValueError),
    ("softmax_scale", lambda a: a.update(softmax_scale="0.1"), TypeError),
]


@pytest.mark.parametrize("name,mutate,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_are_refused(name, mutate, error):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=name):
        lookfast.varlen_attention(**args)


@pytest.mark.parametrize(
    "name,kwargs,error",
    [
        ("q", dict(q=torch.randn(2, 3, 4)), ValueError),
        ("batch", dict(k=torch.randn(3, 5, 2, 8)), ValueError),
        ("keys", dict(v=torch.randn(2, 6, 2, 8)), ValueError),
        ("kv_lengths", dict(kv_lengths=torch.tensor([1.0, 2.0])), TypeError),
        ("kv_lengths", dict(kv_lengths=torch.tensor([1, 2, 3])), ValueError),
        ("kv_lengths", dict(kv_lengths=torch.tensor([1, 6])), ValueError),
    ],
)
def test_cross_attention_bad_inputs(name, kwargs, error):
    args = dict(q=torch.randn(2, 3, 4, 8), k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 8))
    args.update(kwargs)
    with pytest.raises(error, match=name):
        lookfast.cross_attention(**args)
