"""Every op's CUDA C++ and Triton backends on a real GPU, in fp32, bf16 and fp16, against float64 math with
FlashAttention's rule: error vs the float64 truth at most 2x (forward) / 3x (gradients) the error of plain PyTorch in
the same dtype (plus one rounding at the result's scale). varlen_attention's bf16/fp16 CUDA forward and backward run
on the tensor cores (wmma) and also, with LOOKFAST_CUDA_MMA=0, on the SIMT kernels. All tests here are marked gpu: they skip on a
machine without a CUDA GPU (tests/conftest.py) and run in `python -m lookfast gpucheck`."""
import math

import pytest
import torch

import lookfast
from lookfast import _backend
from cuda_cases import ATTN, gather_linear, patch_problem
from oracles import varlen_attention as reference, within_flash_rule
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
    within_flash_rule(out, same, truth, 2, "out")
    for name, g, s, t in zip("qkv", grads, same_grads, truth_grads):
        assert g.dtype == dtype
        within_flash_rule(g, s, t, 3, f"d{name}")


@pytest.mark.parametrize("mma", ["1", "0"], ids=["tensor-cores", "simt"])
@pytest.mark.parametrize("dtype", LOW[1:], ids=IDS[1:])
@pytest.mark.parametrize("dk, dv", [(8, 8), (40, 72), (64, 64), (128, 128)])
def test_varlen_attention_cuda_writes_every_element(dk, dv, dtype, mma, monkeypatch):
    # CUDA forward and backward (tensor-core and SIMT kernels) over NaN-filled free blocks of the caching allocator:
    # every output element written, zero gradients for keys of a sample without queries and queries without keys
    monkeypatch.setenv("LOOKFAST_CUDA_MMA", mma)
    check_outputs_fully_written([3, 0, 1, 130, 70], [5, 2, 0, 1, 140], 4, 2, dk, dv, dtype, device="cuda")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_topk_patch_gather(dtype, backend, seed, monkeypatch):
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", backend)
    (images, weight, bias, pos, scores), p = patch_problem(dtype, seed)
    k = 37
    leaves = [t.cuda().requires_grad_() for t in (images, weight, bias, pos)]
    _backend.last_backend.clear()
    idx, tokens = lookfast.topk_patch_gather(leaves[0], scores.cuda(), k, p, *leaves[1:])
    assert_ran(backend, "topk_indices", "patch_gather_embed")
    idx = idx.cpu()
    assert torch.equal(idx, torch.topk(scores, k, dim=1).indices)
    grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got_grads = torch.autograd.grad(tokens, leaves, grad.cuda())

    t64 = [t.double().requires_grad_() for t in (images, weight, bias, pos)]
    truth = gather_linear(*t64, idx, p)
    truth_grads = torch.autograd.grad(truth, t64, grad.double())
    tl_ = [t.clone().requires_grad_() for t in (images, weight, bias, pos)]
    same = gather_linear(*tl_, idx, p)
    same_grads = torch.autograd.grad(same, tl_, grad)
    assert tokens.dtype == dtype
    within_flash_rule(tokens, same, truth, 2, "tokens")
    for name, g, s, t in zip(("images", "weight", "bias", "pos"), got_grads, same_grads, truth_grads):
        within_flash_rule(g, s, t, 3, f"d{name}")


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
