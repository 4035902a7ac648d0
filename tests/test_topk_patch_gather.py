"""lookfast.topk_indices / lookfast.topk_patch_gather (docs/ops.md): reference vs float64 math, C++ CPU vs reference,
Triton launchers (interpreter, CPU tensors) vs reference, gradients, opcheck, torch.compile, bad input, Triton AOT."""
import math

import pytest
import torch
import torch.nn.functional as F

import lookfast
from lookfast.ops.topk_patch_gather import patch_gather_embed_reference, topk_indices_reference

from oracles import flash_atol, patch_tokens, raw_patches, rel_err, topk_order
from triton_aot import compile_reports

kernels = pytest.importorskip("lookfast.kernels.topk_patch_gather")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------------------------------------ helpers
def tie_scores(b: int, n: int, dtype=torch.float32, nan_fraction=0.1) -> torch.Tensor:
    """Scores with many ties (few distinct values), some NaN, one row mostly NaN (fewer numbers than k)."""
    s = torch.randint(-4, 5, (b, n)).to(dtype) / 2
    s[torch.rand(b, n) < nan_fraction] = float("nan")
    if b > 1:
        s[-1, 2:] = float("nan")
    return s


def make_problem(b=3, c=3, gh=5, gw=7, p=4, d=20, dtype=torch.float32, layout="contiguous"):
    images = torch.randn(b, c, gh * p, gw * p, dtype=torch.float64)
    if layout == "channels_last":
        images = images.to(memory_format=torch.channels_last)
    elif layout == "slice":  # a view with a non-unit W stride and an offset
        images = torch.randn(b, c + 1, gh * p, 2 * gw * p, dtype=torch.float64)[:, 1:, :, ::2]
    weight = torch.randn(d, c, p, p, dtype=torch.float64) / (c * p)
    bias = torch.randn(d, dtype=torch.float64)
    pos = torch.randn(gh * gw, d, dtype=torch.float64)
    cast = lambda t: t.to(dtype)
    return dict(images=cast(images), weight=cast(weight), bias=cast(bias), pos=cast(pos), p=p, g=gh * gw)


def packed_layout(order: torch.Tensor, counts: list[int]):
    rows = [order[b, :n] for b, n in enumerate(counts)]
    cu = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    return torch.cat(rows) if rows else order.new_empty(0), cu


# ------------------------------------------------------------------------------------------------ reference vs math
def test_public_api_on_every_backend(backend, seed):
    """One body, every backend (conftest `backend`): selection, embedded and raw tokens, ragged k, gradients, all
    against the float64 oracles."""
    dev = backend.device
    pb = make_problem(b=3, gh=3, gw=5, p=2, d=6, dtype=torch.float32, layout="slice")
    images, weight, bias, pos = (pb[n].to(dev) for n in ("images", "weight", "bias", "pos"))
    s = tie_scores(3, pb["g"])
    idx, tokens = lookfast.topk_patch_gather(images, s.to(dev), 4, pb["p"], weight, bias, pos)
    assert backend.ran("topk_indices") and backend.ran("patch_gather_embed")
    want_idx = torch.tensor([topk_order(row, 4) for row in s])
    assert torch.equal(idx.cpu(), want_idx)
    full = patch_tokens(*(pb[n].double() for n in ("images", "weight", "bias", "pos")), pb["p"])
    assert rel_err(tokens.cpu(), full.gather(1, want_idx[..., None].expand(-1, -1, full.shape[2]))) <= TOL[torch.float32]
    counts = torch.tensor([0, 1, pb["g"]])
    idx, raw, cu = lookfast.topk_patch_gather(images, s.to(dev), counts.to(dev), pb["p"])
    assert cu.tolist() == [0, 0, 1, 1 + pb["g"]]
    want_idx = torch.cat([torch.tensor(topk_order(row, int(n)), dtype=torch.int64) for row, n in zip(s, counts)])
    assert torch.equal(idx.cpu(), want_idx)
    image_of = torch.repeat_interleave(torch.arange(3), counts)
    assert torch.equal(raw.cpu(), raw_patches(pb["images"], pb["p"])[image_of, want_idx])
    # gradients in float64, against autograd through the conv2d definition
    leaves = [pb[n].double().to(dev).requires_grad_() for n in ("images", "weight", "bias", "pos")]
    scores = torch.randn(3, pb["g"], dtype=torch.float64)
    idx, tokens = lookfast.topk_patch_gather(leaves[0], scores.to(dev), 5, pb["p"], *leaves[1:])
    grad = torch.randn(tokens.shape, dtype=torch.float64)
    got = torch.autograd.grad(tokens, leaves, grad.to(dev))
    cpu_leaves = [t.detach().cpu().requires_grad_() for t in leaves]
    full = patch_tokens(*cpu_leaves, pb["p"])
    pick = full.gather(1, idx.cpu()[..., None].expand(-1, -1, full.shape[2]))
    want = torch.autograd.grad(pick, cpu_leaves, grad)
    for g, w in zip(got, want):
        assert rel_err(g.cpu(), w) < 1e-12


def test_reference_selection_matches_python_oracle(seed):
    s = tie_scores(4, 35)
    for k in (0, 1, 17, 35):
        got = topk_indices_reference(s, k)
        for b in range(s.shape[0]):
            assert got[b].tolist() == topk_order(s[b], k), (b, k)


def test_reference_gather_matches_conv2d(seed):
    pb = make_problem(dtype=torch.float64)
    s = torch.randn(3, pb["g"])
    order = topk_indices_reference(s, 6)
    cu = torch.arange(4, dtype=torch.int32) * 6
    got = patch_gather_embed_reference(pb["images"], order.reshape(-1), cu, pb["p"], pb["weight"], pb["bias"], pb["pos"])
    full = patch_tokens(pb["images"], pb["weight"], pb["bias"], pb["pos"], pb["p"])
    want = full.gather(1, order[..., None].expand(-1, -1, full.shape[-1])).reshape(-1, full.shape[-1])
    assert rel_err(got, want) < 1e-12
    raw = patch_gather_embed_reference(pb["images"], order.reshape(-1), cu, pb["p"])
    assert rel_err(raw @ pb["weight"].reshape(pb["weight"].shape[0], -1).T + pb["bias"] + pb["pos"][order.reshape(-1)], want) < 1e-12


# --------------------------------------------------------------------------------------------------------- C++ CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpp_selection(seed, dtype):
    s = tie_scores(5, 37, dtype)
    for k in (0, 1, 20, 37):
        got = torch.ops.lookfast.topk_indices(s, k)
        assert got.dtype == torch.int64 and got.shape == (5, k)
        assert torch.equal(got, topk_indices_reference(s, k)), k
    # non-contiguous scores
    wide = tie_scores(5, 74, dtype)[:, ::2]
    assert torch.equal(lookfast.topk_indices(wide, 9), topk_indices_reference(wide, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpp_selection_signed_zeros_infinities_subnormals(seed, dtype):
    # The CPU selection turns float scores into integer keys: -0.0 must tie with +0.0 (they compare equal), the
    # infinities and subnormals of either sign must keep their order, NaN must come last.
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.tiny / 4, -info.tiny / 4,
                            info.tiny, -info.tiny, info.max, -info.max, 1.0, -1.0], dtype=torch.float64).to(dtype)
    s = special[torch.randint(0, special.numel(), (6, 41))]
    for k in (0, 1, 13, 40, 41):
        assert torch.equal(torch.ops.lookfast.topk_indices(s, k), topk_indices_reference(s, k)), k


def test_cpp_selection_ragged(seed):
    s = tie_scores(4, 23)
    counts = torch.tensor([0, 1, 23, 7], dtype=torch.int32)
    idx, cu = lookfast.topk_indices(s, counts)
    want, want_cu = packed_layout(topk_indices_reference(s, 23), counts.tolist())
    assert torch.equal(idx, want) and torch.equal(cu, want_cu) and cu.dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
def test_cpp_gather_embed_uniform_k(seed, dtype, layout):
    pb = make_problem(dtype=dtype, layout=layout)
    s = tie_scores(3, pb["g"])
    ref64 = lambda x: x.double()
    full = patch_tokens(ref64(pb["images"]), ref64(pb["weight"]), ref64(pb["bias"]), ref64(pb["pos"]), pb["p"])
    for k in (0, 1, 13, pb["g"]):
        order, tokens = lookfast.topk_patch_gather(pb["images"], s, k, pb["p"], pb["weight"], pb["bias"], pb["pos"])
        assert torch.equal(order, topk_indices_reference(s, k))
        assert tokens.shape == (3, k, 20) and tokens.dtype == dtype
        want = full.gather(1, order[..., None].expand(-1, -1, 20))
        assert rel_err(tokens, want) <= TOL[dtype], (k, rel_err(tokens, want))
        order2, raw = lookfast.topk_patch_gather(pb["images"], s, k, pb["p"])
        assert raw.shape == (3, k, 3 * 16)
        want_raw = patch_gather_embed_reference(pb["images"], order2.reshape(-1), torch.arange(4, dtype=torch.int32) * k, pb["p"])
        assert torch.equal(raw.reshape(-1, 48), want_raw)  # a copy: bit exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_gather_embed_ragged(seed, dtype):
    pb = make_problem(b=4, dtype=dtype, layout="channels_last")
    s = tie_scores(4, pb["g"])
    counts = torch.tensor([1, 0, pb["g"], 6])
    idx, tokens, cu = lookfast.topk_patch_gather(pb["images"], s, counts, pb["p"], pb["weight"], pb["bias"], pb["pos"][None])
    want_idx, want_cu = packed_layout(topk_indices_reference(s, pb["g"]), counts.tolist())
    assert torch.equal(idx, want_idx) and torch.equal(cu, want_cu)
    want = patch_gather_embed_reference(*(t.double() for t in (pb["images"],)), want_idx, want_cu, pb["p"],
                                        pb["weight"].double(), pb["bias"].double(), pb["pos"].double())
    assert tokens.shape == (int(counts.sum()), 20)
    assert rel_err(tokens, want) <= TOL[dtype]
    # weight only (no bias, no positions), and raw patches
    _, tw, _ = lookfast.topk_patch_gather(pb["images"], s, counts, pb["p"], pb["weight"])
    assert rel_err(tw, patch_gather_embed_reference(pb["images"].double(), want_idx, want_cu, pb["p"], pb["weight"].double())) <= TOL[dtype]
    _, raw, _ = lookfast.topk_patch_gather(pb["images"], s, counts, pb["p"])
    assert torch.equal(raw, patch_gather_embed_reference(pb["images"], want_idx, want_cu, pb["p"]))


def test_empty_batches_and_zero_counts():
    w = torch.randn(5, 3, 4, 4)
    idx, tokens, cu = lookfast.topk_patch_gather(torch.randn(2, 3, 8, 8), torch.randn(2, 4), torch.tensor([0, 0]), 4, w)
    assert idx.shape == (0,) and tokens.shape == (0, 5) and cu.tolist() == [0, 0, 0]
    idx, tokens = lookfast.topk_patch_gather(torch.randn(0, 3, 8, 8), torch.randn(0, 4), 2, 4, w)
    assert idx.shape == (0, 2) and tokens.shape == (0, 2, 5)
    idx, tokens, cu = lookfast.topk_patch_gather(torch.randn(0, 3, 8, 8), torch.randn(0, 4), torch.zeros(0, dtype=torch.long), 4)
    assert idx.shape == (0,) and tokens.shape == (0, 48) and cu.tolist() == [0]


def test_scores_get_no_gradient():
    scores = torch.randn(2, 4, requires_grad=True)
    weight = torch.randn(5, 3, 4, 4, requires_grad=True)
    _, tokens = lookfast.topk_patch_gather(torch.randn(2, 3, 8, 8), scores, 3, 4, weight)
    tokens.sum().backward()
    assert scores.grad is None and weight.grad is not None


@pytest.mark.cpu_kernel
def test_cpp_op_rejects_bad_indices_and_offsets():
    images = torch.randn(2, 3, 8, 8)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.lookfast.patch_gather_embed(images, torch.tensor([0, 4]), cu, 4, None, None, None)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.lookfast.patch_gather_embed(images, torch.tensor([0, 1]), torch.tensor([0, 2, 1], dtype=torch.int32), 4, None, None, None)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.lookfast.patch_gather_embed(images, torch.tensor([0, 1]), torch.tensor([0, 1, 3], dtype=torch.int32), 4, None, None, None)


# ------------------------------------------------------------------------------------------------------- gradients
def _grad_inputs(b=2, c=2, gh=3, gw=5, p=2, d=5):
    pb = make_problem(b=b, c=c, gh=gh, gw=gw, p=p, d=d, dtype=torch.float64)
    for key in ("images", "weight", "bias", "pos"):
        pb[key].requires_grad_(True)
    return pb


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck(seed, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("LOOKFAST_BACKEND", "reference")
    pb = _grad_inputs()
    s = tie_scores(2, pb["g"], torch.float64, nan_fraction=0.0)
    p = pb["p"]
    embed = lambda im, w, b, pe: lookfast.topk_patch_gather(im, s, 4, p, w, b, pe)[1]
    assert torch.autograd.gradcheck(embed, (pb["images"], pb["weight"], pb["bias"], pb["pos"][None]))
    if backend == "reference":
        return  # the reference is plain autograd; its ragged and raw paths are covered through the C++ comparison
    counts = torch.tensor([3, 0])
    ragged = lambda im, w, pe: lookfast.topk_patch_gather(im, s, counts, p, w, None, pe)[1]
    assert torch.autograd.gradcheck(ragged, (pb["images"], pb["weight"], pb["pos"]))
    raw = lambda im: lookfast.topk_patch_gather(im, s, torch.tensor([1, pb["g"]]), p)[1]
    assert torch.autograd.gradcheck(raw, (pb["images"],))


def test_cpp_backward_matches_reference_bf16(seed):
    pb = make_problem(b=3, dtype=torch.bfloat16, layout="channels_last")
    s = tie_scores(3, pb["g"])
    grads = {}
    for name in ("cpp", "ref64"):
        leaves = [t.detach().double().requires_grad_() if name == "ref64" else t.detach().clone().requires_grad_()
                  for t in (pb["images"], pb["weight"], pb["bias"], pb["pos"])]
        idx, tokens, cu = (lookfast.topk_patch_gather if name == "cpp" else _reference_public)(
            leaves[0], s, torch.tensor([4, 0, 9]), pb["p"], *leaves[1:])
        torch.manual_seed(1)
        tokens.backward(torch.randn(tokens.shape).to(tokens.dtype))
        grads[name] = [t.grad for t in leaves]
    for got, want in zip(grads["cpp"], grads["ref64"]):
        assert rel_err(got, want) <= TOL[torch.bfloat16]


def _reference_public(images, scores, counts, p, weight, bias, pos):
    idx, cu = packed_layout(topk_indices_reference(scores, int(counts.max())), counts.tolist())
    return idx, patch_gather_embed_reference(images, idx, cu, p, weight, bias, pos), cu


# ---------------------------------------------------------------------------- bf16 / fp16: the accuracy rule, autocast
LOW = [torch.bfloat16, torch.float16]


def _low_problem(dtype, layout, seed_offset=0):
    """Realistic widths (K = 3*14*14 = 588 products per token, D 96), ragged counts with 0 and 1, a non-trivial
    image layout; the float64 copies hold exactly the low-precision values (the truth sees the same inputs)."""
    pb = make_problem(b=4, c=3, gh=4, gw=6, p=14, d=96, dtype=dtype, layout=layout)
    pb["scores"] = torch.randn(4, pb["g"])
    pb["counts"] = torch.tensor([5, 0, 1, pb["g"]])
    return pb


def _torch_tokens(images, weight, bias, pos, idx, cu, p):
    """Plain PyTorch in the inputs' dtype, what a user writes: unfold every patch, gather, F.linear, + positions."""
    b, c = images.shape[:2]
    patches = F.unfold(images, p, stride=p).transpose(1, 2)  # (B, G, C*p*p)
    image_of_row = torch.repeat_interleave(torch.arange(b), (cu[1:] - cu[:-1]).long(), output_size=idx.shape[0])
    rows = patches[image_of_row, idx]
    return F.linear(rows, weight.reshape(weight.shape[0], -1), bias) + pos[idx]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
def test_low_precision_forward_rule(seed, dtype, layout):
    """Error vs float64 math at most 2x torch's own in the same dtype; and every token rounded once: the fp32
    accumulation of bias + positions + products, rounded to `dtype`, agrees with the rounded float64 truth except
    where the truth sits within fp32 noise of a rounding boundary (two roundings would disagree on ~1/4 of them)."""
    pb = _low_problem(dtype, layout)
    p = pb["p"]
    idx, tokens, cu = lookfast.topk_patch_gather(pb["images"], pb["scores"], pb["counts"], p, pb["weight"],
                                                 pb["bias"], pb["pos"])
    assert tokens.dtype == dtype and tokens.shape == (int(pb["counts"].sum()), 96)
    truth = patch_gather_embed_reference(pb["images"].double(), idx, cu, p, pb["weight"].double(),
                                         pb["bias"].double(), pb["pos"].double())
    plain = _torch_tokens(pb["images"], pb["weight"], pb["bias"], pb["pos"], idx, cu, p)
    ours_err, torch_err = rel_err(tokens, truth), rel_err(plain, truth)
    assert ours_err <= 2 * torch_err, (ours_err, torch_err)
    mismatch = (tokens != truth.to(dtype)).double().mean().item()
    assert mismatch <= 0.02, mismatch
    # no bias / no positions / neither: the same one-rounding path
    for bias, pos in ((None, pb["pos"]), (pb["bias"], None), (None, None)):
        _, t2, _ = lookfast.topk_patch_gather(pb["images"], pb["scores"], pb["counts"], p, pb["weight"], bias, pos)
        want = patch_gather_embed_reference(pb["images"].double(), idx, cu, p, pb["weight"].double(),
                                            None if bias is None else bias.double(),
                                            None if pos is None else pos.double())
        assert (t2 != want.to(dtype)).double().mean().item() <= 0.02


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_forward_many_blocks(seed, dtype):
    """Row and column tails of the blocked GEMM and of the weight's VNNI repack: 147 rows (64-row blocks: 2 full and
    a tail), D 100 (64-wide column blocks: one full and a tail; 16-wide repack tiles: a tail), K/2 = 294 word columns
    (a repack tail). Every token rounded once (agrees with the rounded float64 truth but for fp32 noise at rounding
    boundaries), within the 2x rule, and a NaN pixel poisons exactly the rows of the patch holding it."""
    pb = make_problem(b=3, c=3, gh=8, gw=9, p=14, d=100, dtype=dtype)
    p, g = pb["p"], pb["g"]
    scores, counts = torch.randn(3, g), torch.tensor([72, 5, 70])
    idx, tokens, cu = lookfast.topk_patch_gather(pb["images"], scores, counts, p, pb["weight"], pb["bias"], pb["pos"])
    assert tokens.shape == (147, 100) and tokens.dtype == dtype
    truth = patch_gather_embed_reference(pb["images"].double(), idx, cu, p, pb["weight"].double(),
                                         pb["bias"].double(), pb["pos"].double())
    plain = _torch_tokens(pb["images"], pb["weight"], pb["bias"], pb["pos"], idx, cu, p)
    assert rel_err(tokens, truth) <= 2 * rel_err(plain, truth)
    assert (tokens != truth.to(dtype)).double().mean().item() <= 0.02
    images = pb["images"].clone()
    first = int(idx[0])  # image 0's best patch: one pixel of it becomes NaN
    images[0, 1, (first // 9) * p + 3, (first % 9) * p + 5] = float("nan")
    _, poisoned, _ = lookfast.topk_patch_gather(images, scores, counts, p, pb["weight"], pb["bias"], pb["pos"])
    assert poisoned[0].isnan().all() and not poisoned[1:].isnan().any()
    assert torch.equal(poisoned[1:], tokens[1:])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_backward_rule(seed, dtype):
    """Gradients vs float64 math at most 3x torch's own (unfold + linear + positions) in the same dtype. Positions
    shared by several images accumulate in fp32 (rounded once)."""
    pb = _low_problem(dtype, "channels_last")
    p = pb["p"]
    # every image keeps the same first patches, so position rows are shared by 3 images
    scores = torch.arange(pb["g"], 0, -1, dtype=torch.float32).repeat(4, 1)
    counts = torch.tensor([7, 0, 7, 7])
    grads = {}
    for name in ("ours", "torch", "truth"):
        cast = (lambda t: t.detach().double()) if name == "truth" else (lambda t: t.detach().clone())
        leaves = [cast(pb[key]).requires_grad_() for key in ("images", "weight", "bias", "pos")]
        if name == "ours":
            _, tokens, _ = lookfast.topk_patch_gather(leaves[0], scores, counts, p, *leaves[1:])
        else:
            idx, cu = packed_layout(topk_indices_reference(scores, 7), counts.tolist())
            tokens = _torch_tokens(*leaves, idx, cu, p)
        g = torch.Generator().manual_seed(seed)
        tokens.backward(torch.randn(tokens.shape, generator=g).to(dtype).to(tokens.dtype))
        grads[name] = [t.grad for t in leaves]
    for label, ours, plain, truth in zip(("images", "weight", "bias", "pos"), grads["ours"], grads["torch"],
                                         grads["truth"]):
        assert ours.dtype == dtype
        assert rel_err(ours, truth) <= 3 * rel_err(plain, truth) + 1e-6, label


def test_autocast_runs_the_embedding_in_the_autocast_dtype(seed):
    """Under torch.autocast the op behaves as nn.Linear: float32 inputs run in bf16 (the same result as casting
    them by hand), gradients reach the float32 leaves in float32; raw patches stay in the images' dtype."""
    pb = _low_problem(torch.float32, "contiguous")
    leaves = [pb[key].detach().clone().requires_grad_() for key in ("images", "weight", "bias", "pos")]
    with torch.autocast("cpu", torch.bfloat16):
        idx, tokens = lookfast.topk_patch_gather(leaves[0], pb["scores"], 5, pb["p"], *leaves[1:])
        _, raw = lookfast.topk_patch_gather(leaves[0], pb["scores"], 5, pb["p"])
    assert tokens.dtype == torch.bfloat16 and raw.dtype == torch.float32
    cast = [t.detach().to(torch.bfloat16) for t in leaves]
    _, want = lookfast.topk_patch_gather(cast[0], pb["scores"], 5, pb["p"], *cast[1:])
    assert torch.equal(tokens, want)
    tokens.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


@pytest.mark.parametrize("dtype", LOW)
def test_opcheck_and_compile_low_precision(seed, dtype):
    pb = make_problem(b=2, gh=3, gw=5, p=4, d=16, dtype=dtype)
    s = torch.randn(2, pb["g"])
    idx = torch.ops.lookfast.topk_indices(s, 4).reshape(-1)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    args = (pb["images"], idx, cu, pb["p"], pb["weight"], pb["bias"], pb["pos"])
    torch.library.opcheck(torch.ops.lookfast.patch_gather_embed, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    grad = torch.randn(8, 16).to(dtype)
    torch.library.opcheck(torch.ops.lookfast.patch_gather_embed_backward,
                          (grad, pb["images"], idx, cu, pb["p"], pb["weight"], pb["pos"], [True, True, True, True]))

    def f(images, weight, bias, pos):
        with torch.autocast("cpu", torch.bfloat16):
            return lookfast.topk_patch_gather(images, s, 5, 4, weight, bias, pos)[1] * 2

    f32 = [pb[key].float() for key in ("images", "weight", "bias", "pos")]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*f32), f(*f32))


# -------------------------------------------------------------------------------------------------- opcheck, compile
def test_opcheck_cpp_ops(seed):
    pb = _grad_inputs()
    s = torch.randn(2, pb["g"], dtype=torch.float64)
    order = torch.ops.lookfast.topk_indices(s, 4)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    idx = order.reshape(-1)
    torch.library.opcheck(torch.ops.lookfast.topk_indices, (s, 4))
    torch.library.opcheck(torch.ops.lookfast.patch_gather_embed, (pb["images"], idx, cu, pb["p"], pb["weight"], pb["bias"], pb["pos"]))
    torch.library.opcheck(torch.ops.lookfast.patch_gather_embed, (pb["images"], idx, cu, pb["p"], None, None, None))
    grad = torch.randn(8, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lookfast.patch_gather_embed_backward,
                          (grad, pb["images"].detach(), idx, cu, pb["p"], pb["weight"].detach(), pb["pos"].detach(), [True, True, True, True]))
    torch.library.opcheck(torch.ops.lookfast.patch_gather_embed_backward,
                          (grad, pb["images"].detach(), idx, cu, pb["p"], pb["weight"].detach(), None, [True, False, True, False]))


def test_torch_compile_fullgraph(seed):
    pb = make_problem(b=2, gh=3, gw=5, p=4, d=16)
    s = torch.randn(2, pb["g"])

    def f(images, scores, weight, bias, pos):
        idx, tokens = lookfast.topk_patch_gather(images, scores, 5, 4, weight, bias, pos[None])
        return tokens * 2 + 1, idx

    args = (pb["images"], s, pb["weight"], pb["bias"], pb["pos"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, got_idx = compiled(*args)
    want, want_idx = f(*args)
    assert torch.equal(got_idx, want_idx) and rel_err(got, want) < 1e-6


# ------------------------------------------------------------------------------------------------------ bad input
def _bad_cases():
    im = torch.randn(2, 3, 8, 12)
    s = torch.randn(2, 6)
    w = torch.randn(5, 3, 4, 4)
    ok = dict(images=im, scores=s, k=2, patch_size=4, weight=w, bias=torch.randn(5), pos_embed=torch.randn(6, 5))
    cases = [
        ("k", ValueError, dict(k=7)),
        ("k", ValueError, dict(k=-1)),
        ("k", TypeError, dict(k=2.0)),
        ("k", TypeError, dict(k=torch.tensor([1.0, 2.0]))),
        ("k", ValueError, dict(k=torch.tensor([1, 2, 3]))),
        ("k", ValueError, dict(k=torch.tensor([1, 9]))),
        ("k", ValueError, dict(k=torch.tensor([-1, 2]))),
        ("multiples of patch_size", ValueError, dict(images=torch.randn(2, 3, 8, 13))),
        ("patch_size", ValueError, dict(patch_size=0)),
        ("patch_size", TypeError, dict(patch_size=4.0)),
        ("scores", ValueError, dict(scores=torch.randn(2, 7))),
        ("scores", ValueError, dict(scores=torch.randn(3, 6))),
        ("scores", ValueError, dict(scores=torch.randn(12))),
        ("scores", TypeError, dict(scores=torch.ones(2, 6, dtype=torch.int64))),
        ("images", TypeError, dict(images=im.to(torch.int32))),
        ("images", ValueError, dict(images=im[0])),
        ("images", TypeError, dict(images=im.numpy())),
        ("weight", TypeError, dict(weight=w.double())),
        ("weight", ValueError, dict(weight=torch.randn(5, 3, 2, 2))),
        ("weight", ValueError, dict(weight=torch.randn(5, 4, 4, 4))),
        ("bias", ValueError, dict(bias=torch.randn(4))),
        ("bias", TypeError, dict(bias=torch.randn(5).half())),
        ("pos_embed", ValueError, dict(pos_embed=torch.randn(7, 5))),
        ("pos_embed", ValueError, dict(pos_embed=torch.randn(2, 6, 5))),
        ("pos_embed", ValueError, dict(pos_embed=torch.randn(6, 4))),
        ("bias needs weight", ValueError, dict(weight=None, pos_embed=None)),
        ("device", ValueError, dict(weight=w.to("meta"))),
    ]
    return ok, cases


@pytest.mark.parametrize("case", range(len(_bad_cases()[1])))
def test_bad_input_is_refused_naming_the_argument(case):
    ok, cases = _bad_cases()
    name, error, change = cases[case]
    with pytest.raises(error, match=name):
        lookfast.topk_patch_gather(**{**ok, **change})


def test_topk_indices_bad_input():
    with pytest.raises(ValueError, match="k must be in 0..6"):
        lookfast.topk_indices(torch.randn(2, 6), 7)
    with pytest.raises(ValueError, match="scores"):
        lookfast.topk_indices(torch.randn(6), 2)
    with pytest.raises(TypeError, match="k"):
        lookfast.topk_indices(torch.randn(2, 6), torch.tensor([[1], [2]], dtype=torch.int16))


# ---------------------------------------------------------------------------------- Triton (interpreter, CPU tensors)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_triton_selection(seed, dtype):
    s = tie_scores(3, 35, dtype)  # one program of 128 per row, two BLOCK_J steps
    for k in (0, 1, 17, 35):
        out = torch.full((3, k), -7, dtype=torch.int64)  # poisoned
        got = kernels.topk_indices(s, k, out=out)
        assert torch.equal(got, topk_indices_reference(s, k)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
def test_triton_gather_and_embed(seed, dtype, layout):
    pb = make_problem(b=3, dtype=dtype, layout=layout)
    order = topk_indices_reference(torch.randn(3, pb["g"]), pb["g"])
    idx, cu = packed_layout(order, [1, 0, 19])
    raw = kernels.patch_gather(pb["images"], idx, cu, pb["p"], out=torch.full((20, 48), float("nan"), dtype=dtype))
    assert torch.equal(raw, patch_gather_embed_reference(pb["images"], idx, cu, pb["p"]))
    for extra in ((None, None), (pb["bias"], None), (None, pb["pos"]), (pb["bias"], pb["pos"])):
        out = torch.full((20, 20), float("nan"), dtype=dtype)
        got = kernels.patch_embed(pb["images"], idx, cu, pb["p"], pb["weight"], *extra, out=out)
        want = patch_gather_embed_reference(pb["images"].double(), idx, cu, pb["p"], pb["weight"].double(),
                                            None if extra[0] is None else extra[0].double(),
                                            None if extra[1] is None else extra[1].double())
        assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_embed_low_precision_within_flash_rule(seed, dtype):
    """bf16/fp16 pixels and weights feed tl.dot in their own dtype (tensor cores on a GPU; exact products and fp32 sums
    under the interpreter, tests/conftest.py), bias and positions are added in fp32 and the sum rounded once: error vs
    float64 at most 2x that of plain PyTorch in the same dtype (gather, then F.linear, then + pos, all in `dtype`).
    Several K steps of both configurations (K = 3*6*6 = 108) and ragged row / column edges."""
    pb = make_problem(b=3, c=3, gh=6, gw=7, p=6, d=70, dtype=dtype)
    order = topk_indices_reference(torch.randn(3, pb["g"]), pb["g"])
    idx, cu = packed_layout(order, [41, 0, 30])
    for extra in ((None, None), (pb["bias"], pb["pos"])):
        out = torch.full((71, 70), float("nan"), dtype=dtype)
        got = kernels.patch_embed(pb["images"], idx, cu, pb["p"], pb["weight"], *extra, out=out)
        assert got.dtype == dtype and not got.isnan().any()
        truth = patch_gather_embed_reference(pb["images"].double(), idx, cu, pb["p"], pb["weight"].double(),
                                             *(None if t is None else t.double() for t in extra))
        patches = patch_gather_embed_reference(pb["images"], idx, cu, pb["p"])
        torch_lowp = F.linear(patches, pb["weight"].reshape(70, -1), extra[0])
        if extra[1] is not None:
            torch_lowp = torch_lowp + extra[1][idx]
        err = (got.double() - truth).abs().max().item()
        base = (torch_lowp.double() - truth).abs().max().item()
        assert err <= 2 * base + flash_atol(truth, dtype), (err, base, flash_atol(truth, dtype))


def test_triton_embed_multiple_tiles(seed):
    """More rows than BLOCK_M and D > BLOCK_N with a ragged edge: 2 x 2 programs, masked edges."""
    pb = make_problem(b=2, c=3, gh=7, gw=11, p=2, d=70)
    order = topk_indices_reference(torch.randn(2, pb["g"]), pb["g"])
    idx, cu = packed_layout(order, [70, 1])
    got = kernels.patch_embed(pb["images"], idx, cu, pb["p"], pb["weight"], pb["bias"], pb["pos"],
                              out=torch.full((71, 70), float("nan")))
    want = patch_gather_embed_reference(pb["images"].double(), idx, cu, pb["p"], pb["weight"].double(),
                                        pb["bias"].double(), pb["pos"].double())
    assert rel_err(got, want) <= 1e-5


def test_triton_backward_matches_reference(seed):
    pb = make_problem(b=3, gh=3, gw=5, p=2, d=6, dtype=torch.float64, layout="channels_last")
    order = topk_indices_reference(torch.randn(3, pb["g"]), pb["g"])
    idx, cu = packed_layout(order, [4, 0, 15])
    grad = torch.randn(19, 6, dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_() for t in (pb["images"], pb["weight"], pb["bias"], pb["pos"])]
    patch_gather_embed_reference(leaves[0], idx, cu, pb["p"], *leaves[1:]).backward(grad)
    got = kernels.patch_gather_embed_backward(grad, pb["images"], idx, cu, pb["p"], pb["weight"], pb["pos"], [True] * 4)
    for g, leaf in zip(got, leaves):
        assert rel_err(g, leaf.grad) < 1e-12
    raw_grad = torch.randn(19, 3 * 2 * 2, dtype=torch.float64)
    images = pb["images"].detach().clone().requires_grad_()
    patch_gather_embed_reference(images, idx, cu, pb["p"]).backward(raw_grad)
    got = kernels.patch_gather_embed_backward(raw_grad, pb["images"], idx, cu, pb["p"], None, None, [True, False, False, False])
    assert torch.equal(got[0], images.grad)


def test_triton_ops_autograd_and_opcheck(seed):
    """The lookfast::<op>_triton ops (what CUDA tensors run with Triton) on CPU tensors under the interpreter."""
    pb = _grad_inputs(b=2, gh=3, gw=3, p=2, d=4)
    s = torch.randn(2, pb["g"], dtype=torch.float64)
    order = torch.ops.lookfast.topk_indices_triton(s, 3)
    assert torch.equal(order, topk_indices_reference(s, 3))
    idx, cu = order.reshape(-1), torch.tensor([0, 3, 6], dtype=torch.int32)
    # autograd through the triton_op (its registered backward) against autograd through the reference
    leaves = (pb["images"], pb["weight"], pb["bias"], pb["pos"])
    grad = torch.randn(6, 4, dtype=torch.float64)
    got = torch.autograd.grad(torch.ops.lookfast.patch_gather_embed_triton(pb["images"], idx, cu, pb["p"], *leaves[1:]), leaves, grad)
    want = torch.autograd.grad(patch_gather_embed_reference(pb["images"], idx, cu, pb["p"], *leaves[1:]), leaves, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12
    torch.library.opcheck(torch.ops.lookfast.patch_gather_embed_triton,
                          (pb["images"], idx, cu, pb["p"], pb["weight"], pb["bias"], pb["pos"]),
                          # test_faketensor is left out: the interpreter dereferences the FakeTensors it is handed
                          # (on a GPU, wrap_triton traces without running); the fake path is exercised by
                          # torch.compile on GPUs (test_gpu_backends_match_cpu runs the ops eagerly there).
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.gpu
def test_gpu_backends_match_cpu(seed):
    pb = make_problem(b=3, gh=9, gw=13, p=14, d=64, dtype=torch.bfloat16)
    s = torch.randn(3, pb["g"])
    cpu = lookfast.topk_patch_gather(pb["images"], s, 20, 14, pb["weight"], pb["bias"], pb["pos"])
    for backend in ("cuda", "triton"):
        import os
        os.environ["LOOKFAST_GPU_BACKEND"] = backend
        try:
            got = lookfast.topk_patch_gather(*(t.cuda() for t in (pb["images"], s)), 20, 14,
                                             *(t.cuda() for t in (pb["weight"], pb["bias"], pb["pos"])))
        finally:
            del os.environ["LOOKFAST_GPU_BACKEND"]
        assert torch.equal(got[0].cpu(), cpu[0]) and rel_err(got[1].cpu(), cpu[1]) < 1e-2


# ----------------------------------------------------------------------------------------- Triton ahead-of-time
_MOD = "lookfast.kernels.topk_patch_gather"


def _aot_jobs():
    i32 = "i32"
    common = dict(rows=i32, num_images=i32, grid_w=i32, num_patches=i32, patch_dim=i32, s_b=i32, s_c=i32, s_h=i32, s_w=i32)
    jobs = []
    for arch in (80, 90):
        cfg = {k: v for k, v in kernels.TOPK_CONFIG.items()}
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        jobs.append(dict(kernel="topk_rank_kernel", arch=arch, num_warps=warps, num_stages=stages, constexprs=cfg,
                         signature=dict(scores_ptr="*fp32", out_ptr="*i64", n=i32, k=i32, stride_row=i32,
                                        BLOCK_I="constexpr", BLOCK_J="constexpr")))
        for name, first, out in (("patch_gather_kernel", "img_ptr", "out_ptr"), ("patch_scatter_kernel", "grad_ptr", "img_ptr")):
            cfg = {k: v for k, v in kernels.GATHER_CONFIG.items()}
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            sig = {first: "*bf16", "idx_ptr": "*i64", "cu_ptr": "*i32", out: "*bf16", **common,
                   "P": "constexpr", "BLOCK_R": "constexpr", "BLOCK_E": "constexpr"}
            jobs.append(dict(kernel=name, arch=arch, num_warps=warps, num_stages=stages, constexprs=dict(P=14, **cfg), signature=sig))
        for dt, torch_dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            cfg = {k: v for k, v in kernels.embed_config(torch_dt).items()}
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            sig = dict(img_ptr=f"*{dt}", idx_ptr="*i64", cu_ptr="*i32", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", pos_ptr=f"*{dt}",
                       out_ptr=f"*{dt}", rows=i32, num_images=i32, grid_w=i32, num_patches=i32, patch_dim=i32, embed_dim=i32,
                       s_b=i32, s_c=i32, s_h=i32, s_w=i32, P="constexpr", HAS_BIAS="constexpr", HAS_POS="constexpr",
                       ACC_FP64="constexpr", IEEE="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                       BLOCK_K="constexpr")
            jobs.append(dict(kernel="patch_embed_kernel", arch=arch, num_warps=warps, num_stages=stages, signature=sig,
                             constexprs=dict(P=14, HAS_BIAS=True, HAS_POS=True, ACC_FP64=False, IEEE=dt == "fp32",
                                             **cfg)))
    return [dict(module=_MOD, **j) for j in jobs]


def test_triton_kernels_compile_for_sm80_sm90_without_spills():
    jobs = _aot_jobs()
    reports = compile_reports(jobs)
    problems = []
    for job, rep in zip(jobs, reports):
        label = f"{job['kernel']} {job['signature'].get('img_ptr', job['signature'].get('scores_ptr'))} sm_{job['arch']}"
        if "error" in rep:
            problems.append(f"{label}: {rep['error'][:500]}")
        elif rep["spill_stores"] or rep["spill_loads"]:
            problems.append(f"{label}: spills {rep['spill_stores']}/{rep['spill_loads']} bytes, {rep['registers']} registers")
        elif job["kernel"] == "patch_embed_kernel":
            # bf16/fp16 must run the GEMM on tensor cores; fp32 stays on exact (ieee) FMA products
            low = job["signature"]["img_ptr"] in ("*bf16", "*fp16")
            if low != (rep["tensor_core"] > 0):
                problems.append(f"{label}: {rep['tensor_core']} tensor-core instructions")
    assert not problems, "\n".join(problems)
