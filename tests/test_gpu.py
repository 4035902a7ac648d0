"""Every op's CUDA C++ and Triton backends on a real GPU, in fp32, bf16 and fp16, against float64 math with
FlashAttention's rule: error vs the float64 truth at most 2x (forward) / 3x (gradients) the error of plain PyTorch in
the same dtype (plus one rounding at the result's scale). varlen_attention's bf16/fp16 CUDA forward and backward run
on the tensor cores (wmma) and also, with LOOKFAST_CUDA_MMA=0, on the SIMT kernels. All tests here are marked gpu: they skip on a
machine without a CUDA GPU (tests/conftest.py) and run in `python -m lookfast gpucheck`."""
import math

import pytest
import torch
import torch.nn.functional as F

import lookfast
from lookfast import _backend
from oracles import varlen_attention as reference
from test_varlen_attention_triton import make_case, reference_lowp
from varlen_inputs import check_outputs_fully_written

pytestmark = pytest.mark.gpu

LOW = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


def assert_ran(backend, *ops):
    # the backend asked for is the one that ran (no silent fallback to another backend or the reference)
    want = "triton" if backend == "triton" else "library"
    for op in ops:
        assert _backend.last_backend.get(op) == want, (op, _backend.last_backend)


def cuda_kernels_expected(backend, dtype, dk, dv):
    """The kernel families ("mma" tensor cores, "simt") varlen_attention's CUDA backend may run for this case on
    this GPU; tensor cores are expected for bf16/fp16 with head dims <= 128 on sm_80+, where the tiles fit."""
    major, minor = torch.cuda.get_device_capability()
    if backend == "cuda-simt" or dtype == torch.float32 or max(dk, dv) > 128 or major < 8:
        return {"simt"}
    if (major, minor) in ((8, 0), (9, 0)) or max(dk, dv) <= 64:
        return {"mma"}
    return {"mma", "simt"}  # wide heads on GPUs with less shared memory (sm_86/89): a one-time warning says which


def within_rule(got, torch_same_dtype, truth, factor, what):
    truth = truth.double().cpu()
    err = (got.double().cpu() - truth).abs().max().item()
    base = (torch_same_dtype.double().cpu() - truth).abs().max().item()
    slack = ((truth + 0.3 - 0.3).to(got.dtype).double() - truth).abs().max().item()
    assert err <= factor * base + slack, f"{what}: error {err:.3e} > {factor} x torch's {base:.3e} (+{slack:.1e})"


# (lens_q, lens_k, heads, kv_heads, dk, dv, causal): ragged with 0 and 1, GQA (4 query heads on 2 and on 1 kv heads),
# Lq > Lk and Lq < Lk; width 8 is the Dyn-Perceiver z->x path; the tensor cores pad max(dk, dv) to DP = 16 (8),
# 32, 64 (40 / 24) or 128 (72 / 40, 98, 128); multi-tile samples (> 64 queries and keys) in every kernel, causal and not
ATTN = [
    ([5, 0, 1, 300, 129, 700], [170, 3, 0, 300, 64, 64], 4, 2, 64, 64, False),
    ([5, 0, 1, 300, 129, 700], [170, 3, 0, 300, 64, 64], 4, 2, 64, 64, True),
    ([1, 3136, 17], [64, 64, 0], 2, 1, 8, 8, False),
    ([40, 3, 97], [12, 130, 97], 3, 3, 98, 98, True),
    ([128] * 4, [49] * 4, 1, 1, 32, 32, False),
    ([0, 1, 200, 65, 7], [4, 1, 130, 200, 0], 4, 1, 128, 128, True),
    ([0, 1, 200, 65, 7], [4, 1, 130, 200, 0], 4, 1, 128, 128, False),
    ([3, 150, 1, 64], [0, 150, 77, 64], 2, 2, 40, 72, True),
    ([3, 150, 1, 64], [0, 150, 77, 64], 2, 2, 40, 24, False),
]


@pytest.mark.parametrize("backend", ["cuda", "cuda-simt", "triton"])
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
@pytest.mark.parametrize("case", range(len(ATTN)))
def test_varlen_attention(case, dtype, backend, seed, monkeypatch):
    lens_q, lens_k, heads, kv_heads, dk, dv, causal = ATTN[case]
    if backend.startswith("cuda") and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "lookfast::varlen_attention_fwd", "CUDA"):
        pytest.fail("this lookfast was built without its CUDA kernels")
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", backend.split("-")[0])
    monkeypatch.setenv("LOOKFAST_CUDA_MMA", "0" if backend == "cuda-simt" else "1")
    q, k, v, cu_q, cu_k = make_case(lens_q, lens_k, heads, kv_heads, dk, dv, dtype, seed)
    scale = 1.0 / math.sqrt(dk)
    qd, kd, vd = (t.cuda().requires_grad_() for t in (q, k, v))
    _backend.last_backend.clear()
    out = lookfast.varlen_attention(qd, kd, vd, cu_q.cuda(), cu_k.cuda(), max(lens_q), max(lens_k), scale, causal)
    assert_ran(backend, "varlen_attention_fwd")
    if backend.startswith("cuda"):  # the tensor cores really ran (the CUDA build's diagnostic)
        kernels = cuda_kernels_expected(backend, dtype, dk, dv)
        assert torch.ops.lookfast_cuda.varlen_attention_last_kernel(False) in kernels, kernels
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = torch.autograd.grad(out, (qd, kd, vd), dout.cuda())
    if backend.startswith("cuda"):
        assert torch.ops.lookfast_cuda.varlen_attention_last_kernel(True) in kernels, kernels
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    truth, _ = reference(q64, k64, v64, cu_q, cu_k, scale, causal)
    truth_grads = torch.autograd.grad(truth, (q64, k64, v64), dout.double())
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    same = reference_lowp(ql, kl, vl, cu_q, cu_k, scale, causal)  # plain torch in `dtype` (CPU kernels)
    same_grads = torch.autograd.grad(same, (ql, kl, vl), dout)
    assert out.dtype == dtype and not out.isnan().any()
    within_rule(out, same, truth, 2, "out")
    for name, g, s, t in zip("qkv", grads, same_grads, truth_grads):
        assert g.dtype == dtype
        within_rule(g, s, t, 3, f"d{name}")


@pytest.mark.parametrize("mma", ["1", "0"], ids=["tensor-cores", "simt"])
@pytest.mark.parametrize("dtype", LOW[1:], ids=IDS[1:])
@pytest.mark.parametrize("dk, dv", [(8, 8), (40, 72), (64, 64), (128, 128)])
def test_varlen_attention_cuda_writes_every_element(dk, dv, dtype, mma, monkeypatch):
    # CUDA forward and backward (tensor-core and SIMT kernels) over NaN-filled free blocks of the caching allocator:
    # every output element written, zero gradients for keys of a sample without queries and queries without keys
    monkeypatch.setenv("LOOKFAST_CUDA_MMA", mma)
    check_outputs_fully_written([3, 0, 1, 130, 70], [5, 2, 0, 1, 140], 4, 2, dk, dv, dtype, device="cuda")


def _patch_problem(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    b, c, p, gh, gw, d = 3, 3, 14, 9, 13, 96
    images = torch.randn(b, c, gh * p, gw * p, generator=g)
    weight = torch.randn(d, c, p, p, generator=g) / (c * p)
    bias, pos = torch.randn(d, generator=g), torch.randn(gh * gw, d, generator=g)
    scores = torch.randn(b, gh * gw, generator=g)
    return [t.to(dtype) for t in (images, weight, bias, pos)] + [scores], p


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_topk_patch_gather(dtype, backend, seed, monkeypatch):
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", backend)
    (images, weight, bias, pos, scores), p = _patch_problem(dtype, seed)
    k = 37
    leaves = [t.cuda().requires_grad_() for t in (images, weight, bias, pos)]
    _backend.last_backend.clear()
    idx, tokens = lookfast.topk_patch_gather(leaves[0], scores.cuda(), k, p, *leaves[1:])
    assert_ran(backend, "topk_indices", "patch_gather_embed")
    idx = idx.cpu()
    assert torch.equal(idx, torch.topk(scores, k, dim=1).indices)
    grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got_grads = torch.autograd.grad(tokens, leaves, grad.cuda())

    def plain(imgs, w, bb, pe):  # gather + linear + positions, every op in the leaves' dtype
        b, c, h, wd = imgs.shape
        patches = imgs.unfold(2, p, p).unfold(3, p, p)[torch.arange(b)[:, None], :, idx // (wd // p), idx % (wd // p)]
        return F.linear(patches.reshape(b, k, -1), w.reshape(w.shape[0], -1), bb) + pe[idx]

    t64 = [t.double().requires_grad_() for t in (images, weight, bias, pos)]
    truth = plain(*t64)
    truth_grads = torch.autograd.grad(truth, t64, grad.double())
    tl_ = [t.clone().requires_grad_() for t in (images, weight, bias, pos)]
    same = plain(*tl_)
    same_grads = torch.autograd.grad(same, tl_, grad)
    assert tokens.dtype == dtype
    within_rule(tokens, same, truth, 2, "tokens")
    for name, g, s, t in zip(("images", "weight", "bias", "pos"), got_grads, same_grads, truth_grads):
        within_rule(g, s, t, 3, f"d{name}")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_exit_compact_and_scatter(dtype, backend, seed, monkeypatch):
    # no arithmetic beyond the fp32 confidence: survivors, exited rows and compacted states must be exact
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", backend)
    g = torch.Generator().manual_seed(seed)
    n = 300
    logits = (torch.randn(n, 1000, generator=g) * 3).to(dtype)
    states = [torch.randn(n, 5, 7, generator=g).to(dtype)[:, :, ::2], torch.randint(0, 9, (n, 3), generator=g)]
    conf = logits.double().softmax(-1).amax(-1)
    # a threshold halfway between two neighbouring confidences, so rounding cannot move a row across it
    ordered = conf.sort().values
    gaps = (ordered[1:] - ordered[:-1])[n // 4: 3 * n // 4]
    j = int(gaps.argmax()) + n // 4
    threshold = float((ordered[j] + ordered[j + 1]) / 2)
    _backend.last_backend.clear()
    keep, exited, *compact = lookfast.exit_compact(logits.cuda(), threshold, *(s.cuda() for s in states))
    assert_ran(backend, "exit_confidence_mask", "compact_rows")
    want_keep = torch.nonzero(conf < threshold).squeeze(1)
    assert torch.equal(keep.cpu(), want_keep)
    assert torch.equal(exited.cpu(), torch.nonzero(conf >= threshold).squeeze(1))
    for got, s in zip(compact, states):
        assert torch.equal(got.cpu(), s[want_keep])
    out = torch.full((n, 5, 4), float("nan"), dtype=dtype).cuda()
    lookfast.exit_scatter(out, keep, compact[0])
    assert torch.equal(out.cpu()[want_keep], states[0][want_keep])
