"""lookfast.layer_norm_rows: C++ CPU kernel and the reference backend against float64 math on random rows (fresh
seeds, odd widths, 0 and 1 rows, strided and transposed inputs), every float dtype (bf16/fp16 within 2x torch's own
LayerNorm error in that dtype, each output rounded once), rows far from zero mean, NaN/inf confined to their row,
gradients (gradcheck, opcheck), torch.compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import lookfast
from lookfast import _backend
from oracles import rel_err


def truth(x: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 math, written out: (x - mean) / sqrt(mean((x - mean)^2) + eps) per row."""
    x = x.double()
    mean = x.sum(1, keepdim=True) / x.shape[1]
    var = (x - mean).square().sum(1, keepdim=True) / x.shape[1]
    return (x - mean) / torch.sqrt(var + eps)


def run(x, eps, backend):
    """layer_norm_rows on `backend` ("library": the C++ kernel, "reference"), checking which one ran."""
    with _backend.forced(backend):
        out = lookfast.layer_norm_rows(x, eps)
    assert _backend.last_backend["layer_norm_rows"] == backend
    return out


BACKENDS = ["library", "reference"]


@pytest.fixture(params=BACKENDS)
def which(request):
    if request.param == "library" and not _backend.has_kernel("layer_norm_rows", "CPU"):
        pytest.skip("the compiled library is not loaded (no C++ kernel to test)")
    return request.param


@pytest.mark.parametrize("n,c", [(0, 5), (1, 1), (1, 64), (7, 3), (33, 17), (50, 64), (19, 100), (40, 144),
                                 (3, 1000), (5, 0)])
def test_matches_float64_math(seed, which, n, c):
    x = torch.randn(n, c, dtype=torch.float64) * 3 + torch.randn(n, 1, dtype=torch.float64)
    out = run(x, 1e-5, which)
    assert out.shape == (n, c) and out.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(out, truth(x, 1e-5), rtol=1e-12, atol=1e-12)
    x32 = x.float()
    ours, plain = run(x32, 1e-5, which), F.layer_norm(x32, (c,), None, None, 1e-5)
    if n and c:
        assert rel_err(ours, truth(x32, 1e-5)) <= 2 * max(rel_err(plain, truth(x32, 1e-5)), 1e-7)


@pytest.mark.parametrize("layout", ["pixels", "sliced", "transposed"])
def test_strided_inputs(seed, which, layout):
    if layout == "pixels":  # the fused models' case: channels-last pixel rows, C apart, as a view
        x = torch.randn(3, 24, 5, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
        rows = x.permute(0, 2, 3, 1).reshape(-1, 24)
    elif layout == "sliced":  # rows 2 * 40 apart, 31 of each used
        rows = torch.randn(26, 80, dtype=torch.float64)[::2, 3:34]
    else:  # elements of a row not adjacent: copied once
        rows = torch.randn(19, 13, dtype=torch.float64).t()
    before = rows.clone()
    out = run(rows, 1e-6, which)
    torch.testing.assert_close(out, truth(before, 1e-6), rtol=1e-12, atol=1e-12)
    assert torch.equal(rows, before)  # the input is read only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [64, 144, 37])
def test_low_precision_rule(seed, which, dtype, c):
    """Error vs float64 at most 2x torch's own LayerNorm in the same dtype, and each output rounded once: it agrees
    with the rounded float64 truth except where the truth sits within fp32 noise of a rounding boundary."""
    x = (torch.randn(301, c) * 2 + 0.5).to(dtype)
    out = run(x, 1e-5, which)
    assert out.dtype == dtype
    want = truth(x, 1e-5)
    plain = F.layer_norm(x, (c,), None, None, 1e-5)
    assert rel_err(out, want) <= 2 * rel_err(plain, want)
    assert (out != want.to(dtype)).double().mean().item() <= 0.01


def test_far_from_zero_mean(seed, which):
    """|mean| >> std: the two-pass variance keeps float32 accuracy where sum(x^2)/C - mean^2 would cancel."""
    x = (1e4 + torch.randn(64, 64, dtype=torch.float64)).float()
    want = truth(x, 1e-5)
    assert rel_err(run(x, 1e-5, which), want) <= 2 * rel_err(F.layer_norm(x, (64,), None, None, 1e-5), want) + 1e-6


def test_non_finite_rows_stay_in_their_row(which):
    x = torch.randn(6, 40).to(torch.bfloat16)
    x[1, 3], x[4, 0] = float("nan"), float("inf")
    out = run(x, 1e-5, which)
    assert out[[1, 4]].isnan().all()
    good = [0, 2, 3, 5]
    assert torch.isfinite(out[good]).all()
    assert rel_err(out[good], truth(x[good], 1e-5)) <= 2 * rel_err(
        F.layer_norm(x[good], (40,), None, None, 1e-5), truth(x[good], 1e-5))


def test_gradcheck_and_opcheck(seed):
    x = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lookfast.layer_norm_rows(t, 1e-5), (x,))
    y = torch.randn(7, 21, dtype=torch.float64, requires_grad=True)[:, 2:19]
    assert torch.autograd.gradcheck(lambda t: lookfast.layer_norm_rows(t, 0.1), (y,))
    if _backend.has_kernel("layer_norm_rows", "CPU"):
        torch.library.opcheck(torch.ops.lookfast.layer_norm_rows, (x, 1e-5))
        torch.library.opcheck(torch.ops.lookfast.layer_norm_rows, (torch.randn(5, 64).to(torch.bfloat16), 1e-6))


def test_low_precision_gradient_rule(seed):
    """bf16 gradients within 3x the error of torch's own bf16 LayerNorm backward (float64 truth)."""
    x64 = torch.randn(50, 64, dtype=torch.float64)
    g64 = torch.randn(50, 64, dtype=torch.float64)
    x64.requires_grad_(True)
    (want,) = torch.autograd.grad(truth(x64, 1e-5), x64, g64)
    x = x64.detach().to(torch.bfloat16).requires_grad_(True)
    (ours,) = torch.autograd.grad(lookfast.layer_norm_rows(x, 1e-5), x, g64.to(torch.bfloat16))
    xp = x64.detach().to(torch.bfloat16).requires_grad_(True)
    (plain,) = torch.autograd.grad(F.layer_norm(xp, (64,), None, None, 1e-5), xp, g64.to(torch.bfloat16))
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, want) <= 3 * rel_err(plain, want)


def test_torch_compile_fullgraph(seed):
    x = torch.randn(11, 24)
    compiled = torch.compile(lambda t: lookfast.layer_norm_rows(t, 1e-5) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), lookfast.layer_norm_rows(x, 1e-5) * 2)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(x=[[1.0]]), TypeError, "x"),
    (dict(x=torch.zeros(2, 3, 4)), ValueError, "x"),
    (dict(x=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "x"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps=True), ValueError, "eps"),
    (dict(eps="1e-5"), ValueError, "eps"),
])
def test_bad_input_names_the_argument(kwargs, exc, word):
    args = dict(x=torch.zeros(2, 3), eps=1e-5)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        lookfast.layer_norm_rows(**args)


def test_kernel_refuses_bad_arguments():
    if not _backend.has_kernel("layer_norm_rows", "CPU"):
        pytest.skip("the compiled library is not loaded")
    with pytest.raises(RuntimeError, match="eps"):
        torch.ops.lookfast.layer_norm_rows(torch.zeros(2, 3), -1.0)
    with pytest.raises(RuntimeError, match="N, C"):
        torch.ops.lookfast.layer_norm_rows(torch.zeros(3), 1e-5)
