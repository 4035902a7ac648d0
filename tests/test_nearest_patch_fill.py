"""lookfast.nearest_patch_fill: C++ kernel vs a float64 Python oracle of the neighbour rule, vs the pure-PyTorch
reference backend, ragged lengths (0, 1, < K), non-contiguous values, every float dtype (bf16/fp16 against the
official fill's own error in that dtype), gradients (gradcheck, opcheck), torch.compile, bad input."""
import math

import pytest
import torch

import lookfast
from lookfast.models.lookwhere.fill import fill_reference
from lookfast.ops.nearest_patch_fill import nearest_patch_fill_reference


def oracle(keep, values, grid, lengths=None, neighbours=5):
    """Float64 Python loops: per cell, the kept slots sorted by (distance^2, slot), inverse-distance weights."""
    b, k, c = values.shape
    out = torch.zeros(b, c, grid, grid, dtype=torch.float64)
    for i in range(b):
        n = k if lengths is None else int(lengths[i])
        for r in range(grid):
            for col in range(grid):
                order = sorted(range(n), key=lambda j: ((r - int(keep[i, j]) // grid) ** 2
                                                       + (col - int(keep[i, j]) % grid) ** 2, j))[:neighbours]
                w = [1.0 / (math.sqrt((r - int(keep[i, j]) // grid) ** 2 + (col - int(keep[i, j]) % grid) ** 2)
                            + 1e-8) for j in order]
                total = sum(w)
                for j, wj in zip(order, w):
                    out[i, :, r, col] += (wj / total) * values[i, j].double()
    return out


def rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def random_keep(b, grid, k, gen=None):
    return torch.stack([torch.randperm(grid * grid, generator=gen)[:k] for _ in range(b)])


@pytest.mark.parametrize("grid,k", [(7, 9), (5, 1), (6, 3), (9, 40), (4, 16)])
def test_matches_float64_oracle(seed, grid, k):
    keep = random_keep(3, grid, k)
    values = torch.randn(3, k, 5, dtype=torch.float64)
    lengths = torch.tensor([k, min(1, k), max(0, k - 2)])
    for ln in (None, lengths):
        got = lookfast.nearest_patch_fill(keep, values, grid, ln)
        want = oracle(keep, values, grid, ln)
        # weights are float32 (as the official code): agreement to float32 rounding of the weights
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # the reference's torch.sqrt can be one float32 ulp off the correctly rounded root the kernel takes
        ref = nearest_patch_fill_reference(keep, values, grid, ln)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_ties_go_to_the_earlier_slot():
    # cell (1, 1) of a 3x3 grid: the four edge midpoints are all at distance 1; with K = 2 the first two slots win
    keep = torch.tensor([[5, 1, 7, 3]])  # (1,2), (0,1), (2,1), (1,0)
    values = torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]], dtype=torch.float64)
    out = lookfast.nearest_patch_fill(keep, values, 3, neighbours=2)
    assert out[0, 0, 1, 1].item() == pytest.approx(5.5, abs=1e-6)


def test_empty_and_zero_length_rows():
    keep = torch.tensor([[0, 4], [2, 3]])
    values = torch.randn(2, 2, 3)
    out = lookfast.nearest_patch_fill(keep, values, 3, torch.tensor([0, 1]))
    assert torch.equal(out[0], torch.zeros(3, 3, 3))
    assert torch.allclose(out[1], values[1, 0][:, None, None].expand(3, 3, 3))
    assert lookfast.nearest_patch_fill(keep[:0], values[:0], 3).shape == (0, 3, 3, 3)
    assert lookfast.nearest_patch_fill(keep, values[..., :0], 3).shape == (2, 0, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_rule_and_layouts(seed, dtype):
    """bf16/fp16: error vs float64 at most 2x the official fill's own in that dtype (fp32 weights, summed and rounded
    once; the old fused fill rounded the weights to the values' dtype); non-contiguous values read as given."""
    grid, k, c = 37, 136, 21
    keep = random_keep(2, grid, k)
    base = torch.randn(2, c, k, dtype=torch.float64).to(dtype).transpose(1, 2)  # (B, k, C), non-contiguous
    assert not base.is_contiguous()
    out = lookfast.nearest_patch_fill(keep, base, grid)
    assert out.dtype == dtype and out.shape == (2, c, grid, grid)
    truth = nearest_patch_fill_reference(keep, base.double(), grid)
    official = fill_reference(keep, base, grid).permute(0, 3, 1, 2)
    assert official.dtype == dtype
    err, official_err = rel_err(out, truth), rel_err(official, truth)
    assert err <= 2 * official_err + (1e-6 if dtype == torch.float32 else 0), (err, official_err)


def test_gradcheck_and_opcheck(seed):
    keep = random_keep(2, 5, 6)
    values = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2])
    assert torch.autograd.gradcheck(lambda v: lookfast.nearest_patch_fill(keep, v, 5, lengths), (values,))
    assert torch.autograd.gradcheck(lambda v: lookfast.nearest_patch_fill(keep, v, 5, None, 3), (values,))
    torch.library.opcheck(torch.ops.lookfast.nearest_patch_fill, (keep, values, 5, lengths, 5))
    torch.library.opcheck(torch.ops.lookfast.nearest_patch_fill, (keep, values.detach().float(), 5, None, 2))
    # bf16 gradient matches the float64 one to bf16 rounding (accumulated in fp32)
    v16 = values.detach().bfloat16().requires_grad_()
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    lookfast.nearest_patch_fill(keep, v16, 5, lengths).backward(g.bfloat16())
    v64 = v16.detach().double().requires_grad_()
    nearest_patch_fill_reference(keep, v64, 5, lengths).backward(g.bfloat16().double())
    assert v16.grad.dtype == torch.bfloat16 and rel_err(v16.grad, v64.grad) <= 2 ** -8


def test_torch_compile_fullgraph(seed):
    keep = random_keep(2, 6, 7)
    values = torch.randn(2, 7, 4)
    compiled = torch.compile(lambda v: lookfast.nearest_patch_fill(keep, v, 6) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(values), lookfast.nearest_patch_fill(keep, values, 6) * 2)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(keep=torch.zeros(2, 3)), TypeError, "keep"),
    (dict(keep=torch.zeros(2, 3, 1, dtype=torch.long)), ValueError, "keep"),
    (dict(values=torch.zeros(2, 4, 5)), ValueError, "values"),
    (dict(values=torch.zeros(2, 3, 5, dtype=torch.long)), TypeError, "values"),
    (dict(grid=0), ValueError, "grid"),
    (dict(grid=2.0), TypeError, "grid"),
    (dict(lengths=torch.tensor([1])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths"),
    (dict(neighbours=0), ValueError, "neighbours"),
    (dict(neighbours=17), ValueError, "neighbours"),
])
def test_bad_input_names_the_argument(kwargs, exc, word):
    args = dict(keep=torch.zeros(2, 3, dtype=torch.long), values=torch.zeros(2, 3, 5), grid=4, lengths=None,
                neighbours=5)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        lookfast.nearest_patch_fill(**args)


def test_kernel_refuses_out_of_range_ids():
    with pytest.raises(RuntimeError, match="out of range"):
        lookfast.nearest_patch_fill(torch.tensor([[0, 16]]), torch.zeros(1, 2, 1), 4)
    with pytest.raises(RuntimeError, match="lengths"):
        torch.ops.lookfast.nearest_patch_fill(torch.tensor([[0, 1]]), torch.zeros(1, 2, 1), 4, torch.tensor([3]), 5)
