"""Regression tests for the defects of issue 14 (an audit of 978b5a8), one section per defect.

Each test failed on 978b5a8 and passes now. The out-of-bounds read and the undefined behaviour of defect 3 are
silent in a normal build: their tests assert the documented results, and the sanitizer job of .ci/run (an
AddressSanitizer + UndefinedBehaviorSanitizer build running this file) is what fails on them at 978b5a8.
"""
import math

import pytest
import torch

import lookfast
from lookfast.ops.varlen_attention import varlen_attention_reference

I32 = torch.int32
HALF_TYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cu(*offsets):
    return torch.tensor(offsets, dtype=I32)


# ------------------------------------------------------------------------ 1. NaN and inf in varlen_attention
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_nan_key_poisons_the_queries_that_see_it(dtype):
    q, k, v = torch.randn(3, 1, 8, dtype=dtype), torch.randn(4, 1, 8, dtype=dtype), torch.randn(4, 1, 8, dtype=dtype)
    k[1, 0, 0] = float("nan")
    out, lse = lookfast.varlen_attention(q, k, v, _cu(0, 3), _cu(0, 4), 3, 4, return_lse=True)
    assert out.isnan().all() and lse.isnan().all()  # was finite: the NaN key got weight 0


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_query_gives_nan_not_zeros(dtype, bad):
    q, k, v = torch.randn(5, 2, 16, dtype=dtype), torch.randn(7, 1, 16, dtype=dtype), torch.randn(7, 1, 16, dtype=dtype)
    q[2, 1, 3] = bad
    out = lookfast.varlen_attention(q, k, v, _cu(0, 5), _cu(0, 7), 5, 7)
    ref, _ = varlen_attention_reference(q, k, v, _cu(0, 5), _cu(0, 7), 16 ** -0.5)
    assert out[2, 1].isnan().all()  # was zeros with lse = -inf
    assert torch.equal(out.isnan(), ref.isnan())
    good = ~ref.isnan()
    torch.testing.assert_close(out[good].double(), ref[good].double(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # float32 compute: 1e300 overflows
def test_overflowing_softmax_scale_gives_nan_as_softmax_does(dtype):
    q, k, v = torch.randn(6, 2, 8, dtype=dtype), torch.randn(5, 2, 8, dtype=dtype), torch.randn(5, 2, 8, dtype=dtype)
    cu_q, cu_k = _cu(0, 2, 6), _cu(0, 0, 5)  # sample 0 sees no key: zeros, whatever the scale
    scale = 1e300
    out = lookfast.varlen_attention(q, k, v, cu_q, cu_k, 4, 5, softmax_scale=scale)
    ref, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, scale)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[2:].isnan().all()  # was zeros
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_v_never_reaches_queries_that_see_no_key(dtype, causal):
    # Sample 0: 20 queries, 3 keys, causal -> queries 0..16 see no key; sample 1 has no key at all.
    q = torch.randn(25, 2, 8, dtype=dtype)
    k, v = torch.randn(3, 1, 8, dtype=dtype), torch.randn(3, 1, 8, dtype=dtype)
    v[0, 0, 5] = float("nan")
    cu_q, cu_k = _cu(0, 20, 25), _cu(0, 3, 3)
    out, lse = lookfast.varlen_attention(q, k, v, cu_q, cu_k, 20, 3, causal=causal, return_lse=True)
    unseen = list(range(17)) if causal else []
    for i in unseen + list(range(20, 25)):
        assert torch.equal(out[i], torch.zeros_like(out[i])), i  # exact zeros (was NaN through 0 * NaN)
        assert (lse[:, i] == -math.inf).all()
    seen = [i for i in range(20) if i not in unseen]
    assert out[seen][..., 5].isnan().all()  # NaN value: NaN output where the key is seen
    assert torch.isfinite(lse[:, seen]).all()  # lse depends on q and k only
    ref, _ = varlen_attention_reference(q, k, v, cu_q, cu_k, 8 ** -0.5, causal)
    assert torch.equal(out.isnan(), ref.isnan())


def test_nan_gradients_are_nan_not_dropped():
    q = torch.randn(4, 1, 8, dtype=torch.float32, requires_grad=True)
    k = torch.randn(4, 1, 8)
    k[2, 0, 1] = float("nan")
    k.requires_grad_(True)
    v = torch.randn(4, 1, 8, requires_grad=True)
    lookfast.varlen_attention(q, k, v, _cu(0, 4), _cu(0, 4), 4, 4).sum().backward()
    assert q.grad.isnan().all()


# ------------------------------------------------------------------------ 2. exit_scatter: torn rows, aliasing
def test_exit_scatter_duplicates_never_tear_a_row_and_the_last_wins():
    # 4 MiB float32 rows, each destination written twice, the two writes half the index apart: parallel_for hands
    # the halves to different threads, which raced at 978b5a8 (50-77 of 100 calls left a torn row).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        row, dests = 1 << 20, 4
        values = torch.arange(2 * dests, dtype=torch.float32)[:, None].expand(2 * dests, row).contiguous()
        index = torch.arange(2 * dests) % dests  # 0 1 2 3 0 1 2 3: the second of each pair must win
        for _ in range(20):
            out = torch.full((dests + 1, row), -1.0)
            lookfast.exit_scatter(out, index, values)
            for r in range(dests):
                assert torch.equal(out[r], values[dests + r]), f"row {r} is torn or lost the last write"
            assert (out[dests] == -1).all()
    finally:
        torch.set_num_threads(threads)


def test_exit_scatter_duplicates_strided_path_last_wins():
    out = torch.zeros(6, 4, 3).transpose(1, 2)  # rows not dense: the index_copy_ path
    values = torch.arange(4 * 3 * 4, dtype=torch.float32).reshape(4, 3, 4)
    lookfast.exit_scatter(out, torch.tensor([2, 5, 2, 2]), values)
    assert torch.equal(out[2], values[3]) and torch.equal(out[5], values[1])


def test_exit_scatter_refuses_an_expanded_out():
    out = torch.zeros(1, 8).expand(4, 8)
    with pytest.raises(ValueError, match="out has rows that share memory"):
        lookfast.exit_scatter(out, torch.tensor([0, 1]), torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="share memory"):  # the C++ op itself, called directly
        torch.ops.lookfast.exit_scatter(out, torch.tensor([0, 1]), torch.randn(2, 8))


@pytest.mark.parametrize("view", ["same", "rows", "shifted"])
def test_exit_scatter_refuses_values_aliasing_out(view):
    out = torch.arange(40.0).reshape(10, 4)
    values = {"same": out[:3], "rows": out[4:7], "shifted": out.view(-1)[2:14].view(3, 4)}[view]
    with pytest.raises(ValueError, match="values overlaps out"):
        lookfast.exit_scatter(out, torch.tensor([0, 5, 9]), values)
    with pytest.raises(RuntimeError, match="overlaps"):
        torch.ops.lookfast.exit_scatter(out, torch.tensor([0, 5, 9]), values)


def test_exit_scatter_accepts_disjoint_views_of_one_storage():
    buf = torch.arange(80.0)
    out, values = buf[:40].view(10, 4), buf[40:52].view(3, 4)
    expected = out.clone()
    expected[torch.tensor([0, 5, 9])] = values
    lookfast.exit_scatter(out, torch.tensor([0, 5, 9]), values)
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------ 3. out of bounds, undefined behaviour
def test_value_width_zero():
    q, k, v = torch.randn(8, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 0)
    cu_q, cu_k = _cu(0, 3, 3, 8), _cu(0, 4, 6, 6)
    out, lse = lookfast.varlen_attention(q, k, v, cu_q, cu_k, 5, 4, return_lse=True)
    ref, ref_lse = varlen_attention_reference(q, k, v, cu_q, cu_k, 8 ** -0.5)
    assert out.shape == (8, 4, 0)
    torch.testing.assert_close(lse, ref_lse)


def test_value_width_zero_backward():
    q = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 2, 0, dtype=torch.float64, requires_grad=True)
    out = lookfast.varlen_attention(q, k, v, _cu(0, 2, 5), _cu(0, 4, 6), 3, 4)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))


def test_exit_compact_zero_width_state():
    logits, a, z = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 0)
    keep, exited, ca, cz = lookfast.exit_compact(logits, 2.0, a, z)
    assert keep.tolist() == [0, 1, 2, 3] and exited.numel() == 0
    assert torch.equal(ca, a) and cz.shape == (4, 0)
    keep, exited, cz2, ca2 = lookfast.exit_compact(logits, 0.0, torch.randn(4, 0, 5), a)
    assert keep.numel() == 0 and cz2.shape == (0, 0, 5) and ca2.shape == (0, 2)


def test_huge_patch_size_on_an_empty_image_is_refused_not_overflowed():
    images = torch.randn(1, 3, 0, 0)
    with pytest.raises(ValueError, match="patch_size"):
        lookfast.topk_patch_gather(images, torch.randn(1, 0), 0, 2**62)
    idx, cu = torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0], dtype=I32)
    with pytest.raises(RuntimeError, match="overflows"):  # the C++ op called directly checks too
        torch.ops.lookfast.patch_gather_embed(images, idx, cu, 2**62, None, None, None)


# ------------------------------------------------------------------------ 4. calibration reproduced exactly
def _runner_exits(per_exit_logits):
    """The exits EarlyExitRunner takes when exit e's head returns per_exit_logits[e] for the surviving samples."""
    n = per_exit_logits[0].shape[0]
    stages = [lambda s: s] * len(per_exit_logits)
    heads = [lambda s, e=e: per_exit_logits[e][s[0]] for e in range(len(per_exit_logits))]
    runner = lookfast.EarlyExitRunner(stages, heads)
    return lambda thresholds: runner((torch.arange(n),), thresholds)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_runner_reproduces_calibrated_exit_counts_exactly(dtype, seed):
    # With continuous random logits there are no ties, so exactly floor(n * p_e) samples must leave at exit e. At
    # 978b5a8 the runner's confidence could land 1 ulp below the calibrated threshold (10/300 float32, 100/300
    # float64, 30/300 bf16 calibrations moved a sample).
    gen = torch.Generator().manual_seed(seed)
    mismatches = 0
    for trial in range(60):
        n, classes = 37 + trial % 23, 3 + trial % 11
        logits = (torch.randn(3, n, classes, generator=gen, dtype=torch.float64) * (0.5 + trial % 4)).to(dtype)
        conf = torch.softmax(logits.double(), -1).amax(-1)
        if dtype == torch.bfloat16 and any(len(set(c.tolist())) < n for c in conf):
            continue  # bf16 logits can tie exactly; the count would then legitimately exceed k
        p = [0.3, 0.3, 0.4]
        t = lookfast.calibrate_thresholds(logits, p)
        exits = _runner_exits(list(logits))(t.tolist())
        counts = torch.bincount(exits, minlength=3).tolist()
        mismatches += counts[:2] != [math.floor(n * 0.3), math.floor(n * 0.3)]
    assert mismatches == 0


# ------------------------------------------------------------------------ 5. errors name the argument
def test_huge_max_seqlen_names_the_argument():
    q = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="max_seqlen_q") as info:
        lookfast.varlen_attention(q, q, q, _cu(0, 3), _cu(0, 3), 2**70, 3)
    assert "found type" not in str(info.value)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        lookfast.varlen_attention(q, q, q, _cu(0, 3), _cu(0, 3), 3, 2**31)


def test_numpy_weight_is_a_type_error_naming_weight():
    np = pytest.importorskip("numpy")
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        lookfast.topk_patch_gather(images, torch.randn(1, 4), 2, 4, weight=np.zeros((5, 3, 4, 4), np.float32))


def test_cross_attention_too_many_rows_blames_q_briefly():
    q = torch.zeros(1, 1, 1, 8).expand(2**16, 2**15 + 1, 1, 8)  # B*Lq > 2**31 (a view: no memory)
    k = torch.zeros(1, 1, 1, 8).expand(2**16, 2, 1, 8)
    with pytest.raises(ValueError) as info:
        lookfast.cross_attention(q, k, k)
    msg = str(info.value)
    assert msg.startswith("q ") and "cu_seqlens" not in msg and len(msg) < 300


def test_non_monotone_cu_seqlens_message_stays_short():
    n = 100_000
    cu = torch.arange(n + 1, dtype=I32)
    cu[500] = 10  # the first decrease: cu[499] = 499 > cu[500] = 10
    x = torch.randn(n, 1, 4)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[499\]") as info:
        lookfast.varlen_attention(x, x, x, cu, torch.arange(n + 1, dtype=I32), n, n)
    assert len(str(info.value)) < 300


# ------------------------------------------------------------------------ 6. NaN thresholds
@pytest.mark.parametrize("threshold", [float("nan"), torch.tensor(float("nan")), torch.tensor(float("nan"), dtype=torch.float64)])
def test_exit_compact_refuses_a_nan_threshold(threshold):
    with pytest.raises(ValueError, match="threshold is NaN"):
        lookfast.exit_compact(torch.randn(4, 3), threshold)


def test_runner_refuses_nan_thresholds_but_ignores_the_last():
    run = _runner_exits([torch.randn(5, 3), torch.randn(5, 3)])
    with pytest.raises(ValueError, match=r"thresholds\[0\] is NaN"):
        run([float("nan"), 0.0])
    assert run([math.inf, float("nan")]).tolist() == [1] * 5  # the last threshold is ignored, as documented


# ------------------------------------------------------------------------ 7. the CPU buffer pool
def test_cpu_pool_is_capped_and_can_be_emptied():
    if not lookfast._backend.loaded:
        pytest.skip("the pool lives in the compiled library")
    cap = 256 << 20  # the default (LOOKFAST_CPU_POOL_MB unset in CI)
    state = torch.randn(64, 1 << 18)  # 64 MiB
    logits = torch.randn(64, 4)
    for i in range(40):  # survivors of every size: outputs of many sizes are freed into the pool
        out = lookfast.exit_compact(logits, torch.tensor(1.0 - i / 40), state)[2]
        del out
        assert lookfast.cpu_pool_cached_bytes() <= cap
    lookfast.exit_compact(logits, 0.5, state)
    freed = lookfast.cpu_pool_empty_cache()
    assert freed >= 0 and lookfast.cpu_pool_cached_bytes() == 0
    # The pool still works after being emptied.
    keep, exited, compacted = lookfast.exit_compact(logits, 0.9, state)
    assert torch.equal(compacted, state[keep])
