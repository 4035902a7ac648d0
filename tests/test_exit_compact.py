"""exit_compact / exit_scatter (docs/ops.md): every backend against float64 math, C++ and Triton (interpreter, CPU
tensors) against the pure-PyTorch reference, the reference against float64 math. The runner and the calibration
built on them are tested in test_early_exit.py. Thresholds are drawn between two neighbouring confidences (never on
one), so rounding cannot flip a decision.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import lookfast
from lookfast import _backend
from lookfast.ops import exit_compact as ex
from oracles import exit_confidence as exit_confidence_f64
from oracles import threshold_between

CRITERIA = ["max_softmax", "entropy", "margin"]
needs_cpp = pytest.mark.skipif(not _backend.loaded, reason=f"lookfast._C not built: {_backend.load_error}")


# ------------------------------------------------------------------------------------------------------- helpers
def random_logits(n: int, classes: int, dtype=torch.float32, nan_rows: int = 1) -> torch.Tensor:
    x = torch.randn(n, classes, dtype=torch.float64) * 3
    if n and classes > 2:
        x[torch.randint(n, (1,)), torch.randint(classes, (1,))] = float("-inf")  # a masked class
    for r in torch.randperm(n)[:nan_rows].tolist():
        x[r, torch.randint(classes, (1,))] = float("nan")
    return x.to(dtype)


def odd_states(n: int) -> list[torch.Tensor]:
    """Float, half, int64, bool, 1-D, empty trailing dim, and three kinds of non-contiguous states."""
    wide = torch.randn(n, 7, 5)
    return [
        torch.randn(n, 3, 5),
        torch.randn(n, 4).half(),
        torch.randint(-(2**40), 2**40, (n, 3)),
        torch.rand(n, 2, 3) > 0.5,
        torch.randn(n),
        torch.randn(n, 0, 3),
        wide[:, ::2, 1:4],  # strided rows: not memcpy-able
        torch.randn(5, n, 3).transpose(0, 1),  # rows dense but far apart
        torch.randn(n, 2, 6).transpose(1, 2),  # transposed trailing dims: each row one dense block
        torch.randn(n, 3, dtype=torch.float64),
        torch.randn(n, 4, 3, 5).contiguous(memory_format=torch.channels_last),  # CNN activations
    ]


# The layout compact_rows gives each of odd_states' outputs (docs/ops.md section 3): rows that are one dense block
# keep their order within the row (channels_last stays channels_last), anything else comes back contiguous.
EXPECTED_LAYOUT = ["contiguous"] * 8 + [(12, 1, 6), "contiguous", "channels_last"]


def assert_layout(g: torch.Tensor, layout) -> None:
    if layout == "contiguous":
        assert g.is_contiguous(), g.stride()
    elif layout == "channels_last":
        assert g.is_contiguous(memory_format=torch.channels_last) and g.stride()[0] == math.prod(g.shape[1:]), g.stride()
    else:
        assert g.stride() == layout, (g.stride(), layout)


def poison_heap(nbytes: int = 1 << 20) -> None:
    """Free NaN-filled blocks so the next allocations likely reuse garbage (an unwritten output then shows)."""
    blocks = [torch.full((nbytes // 4,), float("nan")) for _ in range(4)]
    blocks += [torch.full((sz,), -1, dtype=torch.int64) for sz in (7, 33, 129)]
    del blocks


def assert_compact_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (i, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w) or (g.is_floating_point() and torch.equal(g.isnan(), w.isnan())
                                    and torch.equal(g.nan_to_num(0), w.nan_to_num(0))), i


# ---------------------------------------------------------------------------------------- reference vs float64
@pytest.mark.parametrize("criterion", CRITERIA)
def test_public_api_on_every_backend(backend, criterion, seed):
    """One body, every backend (conftest `backend`): who leaves and the compacted states, against decisions made
    from float64 confidences (NaN never leaves), for odd states and sizes including 0 and 1 rows."""
    rng = random.Random(seed)
    dev = backend.device
    for n, classes in [(23, 19), (1, 5), (6, 1), (0, 3)]:
        x = random_logits(n, classes, nan_rows=min(n, 2))
        states = odd_states(n)
        conf = exit_confidence_f64(x, criterion)
        thr = threshold_between(conf, rng, 1e-5)
        leaves = (conf <= thr) if criterion == "entropy" else (conf >= thr)  # False where conf is NaN
        want_keep = torch.nonzero(~leaves).squeeze(1)
        want = [want_keep, torch.nonzero(leaves).squeeze(1), *(s.index_select(0, want_keep) for s in states)]
        got = lookfast.exit_compact(x.to(dev), thr, *(s.to(dev) for s in states), criterion=criterion)
        assert backend.ran("exit_confidence_mask") and backend.ran("compact_rows")
        assert_compact_equal([g.cpu() for g in got], want)
        for g, layout in zip(got[2:], EXPECTED_LAYOUT):
            assert_layout(g, layout)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_reference_confidence_matches_float64_math(criterion, seed):
    x = random_logits(23, 37, torch.float64, nan_rows=2)
    x[3] = float("-inf")  # no softmax: NaN
    x[4, 5] = float("inf")  # softmax NaN
    want = exit_confidence_f64(x, criterion)
    got = ex.exit_confidence_reference(x, criterion)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(0), want.nan_to_num(0), rtol=1e-12, atol=1e-12)
    one = torch.randn(4, 1, dtype=torch.float64)
    torch.testing.assert_close(ex.exit_confidence_reference(one, criterion), exit_confidence_f64(one, criterion))


@needs_cpp
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_confidence_contract(criterion, dtype, seed):
    """float32: decisions exact at thresholds 1e-5 from every confidence; half types 1e-2 (docs/ops.md numerics)."""
    rng = random.Random(seed)
    x = random_logits(41, 101, dtype, nan_rows=3)
    conf = exit_confidence_f64(x.double(), criterion)
    gap = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    for _ in range(4):
        thr = threshold_between(conf, rng, gap)
        keep, exited = torch.ops.lookfast.exit_confidence_mask(x, torch.tensor(thr), ex.CRITERIA[criterion])
        passes = conf <= thr if criterion == "entropy" else conf >= thr
        assert keep.tolist() == torch.nonzero(~passes).squeeze(1).tolist()
        assert exited.tolist() == torch.nonzero(passes).squeeze(1).tolist()


@needs_cpp
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("classes", [16, 17, 47, 1000])
def test_cpp_vectorized_float32_rows(criterion, classes, seed):
    """Contiguous float32 rows take the 16-lane path: specials in the vector body and in the scalar tail, ties at
    the maximum (margin 0), rows read through a row stride larger than the row."""
    rng = random.Random(seed)
    body, tail = rng.randrange(min(classes, 16)), classes - 1
    x = torch.randn(12, classes + 3, dtype=torch.float64) * 4
    x[0, body] = float("nan")
    x[1, tail] = float("nan")
    x[2, body] = float("inf")
    x[3, tail] = float("inf")
    x[4] = float("-inf")
    x[5, body] = float("-inf")
    x[6, tail] = float("-inf")
    x[7, :classes] = 0.5  # every class tied: max softmax 1/C, margin 0, entropy log C
    x[8, body] = x[8, tail] = x[8, :classes].max() + 1  # two tied maxima: margin 0
    x[9, :classes] = -200.0
    x[9, body] = 0.0  # the others underflow exp: confidence ~1, margin ~1, entropy ~0
    wide = x.float()[:, :classes]  # rows classes + 3 floats apart: strided rows, contiguous classes
    conf = exit_confidence_f64(wide.double(), criterion)
    for logits in (wide, wide.contiguous()):
        for _ in range(4):
            thr = threshold_between(conf, rng, 1e-5)
            keep, exited = torch.ops.lookfast.exit_confidence_mask(logits, torch.tensor(thr), ex.CRITERIA[criterion])
            passes = conf <= thr if criterion == "entropy" else conf >= thr
            assert keep.tolist() == torch.nonzero(~passes).squeeze(1).tolist()
            assert exited.tolist() == torch.nonzero(passes).squeeze(1).tolist()
    assert torch.isnan(conf[:5]).all() and not torch.isnan(conf[5:]).any()


# ---------------------------------------------------------------------------------------------- C++ vs reference
@needs_cpp
@pytest.mark.parametrize("criterion", CRITERIA)
def test_cpp_matches_reference(criterion, seed, monkeypatch):
    monkeypatch.delenv("LOOKFAST_BACKEND", raising=False)
    rng = random.Random(seed)
    for n, classes in [(37, 19), (1, 5), (64, 1000), (9, 1), (0, 3)]:
        x = random_logits(n, classes, nan_rows=min(n, 2))
        states = odd_states(n)
        conf = ex.exit_confidence_reference(x, criterion)
        for thr in [threshold_between(conf, rng), threshold_between(conf, rng)]:
            want = ex.exit_compact_reference(x, thr, *states, criterion=criterion)
            poison_heap()
            got = lookfast.exit_compact(x, thr, *states, criterion=criterion)
            assert_compact_equal(got, want)
            for g, layout in zip(got[2:], EXPECTED_LAYOUT):
                assert_layout(g, layout)
        nan_rows = torch.isnan(conf).nonzero().squeeze(1).tolist()
        for r in nan_rows:  # NaN confidence never exits
            assert r in got[0].tolist()


@needs_cpp
def test_pooled_outputs_are_fully_written(seed):
    """Large outputs come from a cache of freed buffers: poison it with NaN first, then check every element."""
    x = torch.randn(11, 7)
    thr = threshold_between(ex.exit_confidence_reference(x, "max_softmax"), random.Random(seed))
    m = int((~ex.exit_mask_reference(x, thr)).sum())
    poison = [torch.full((m, 64, 1024), float("nan")), torch.full((m, 300, 1000), float("nan"))]
    outs = lookfast.exit_compact(torch.zeros(m, 7), 2.0, *poison)  # nobody exits: (m, ...) NaN outputs
    assert m == 0 or outs[2].isnan().all()
    del outs  # their buffers go back to the cache, NaN inside
    real = [torch.randn(11, 64, 1024), torch.randn(11, 300, 1000)]
    got = lookfast.exit_compact(x, thr, *real)
    want = ex.exit_compact_reference(x, thr, *real)
    assert_compact_equal(got, want)


@needs_cpp
@pytest.mark.parametrize("criterion", CRITERIA)
def test_all_and_none_exit(criterion):
    x = random_logits(13, 11, nan_rows=0)
    states = odd_states(13)
    everyone, nobody = (float("inf"), -1.0) if criterion == "entropy" else (-1.0, float("inf"))
    keep, exited, *s = lookfast.exit_compact(x, everyone, *states, criterion=criterion)
    assert keep.numel() == 0 and exited.tolist() == list(range(13))
    assert all(t.shape == (0, *st.shape[1:]) and t.dtype == st.dtype for t, st in zip(s, states))
    keep, exited, *s = lookfast.exit_compact(x, torch.tensor(nobody), *states, criterion=criterion)
    assert exited.numel() == 0 and keep.tolist() == list(range(13))
    assert_compact_equal(s, [st.contiguous() for st in states])
    x[4, 2] = float("nan")
    keep, exited = lookfast.exit_compact(x, everyone, criterion=criterion)
    assert keep.tolist() == [4]


def test_exit_scatter_on_every_backend(backend, seed):
    dev = backend.device
    for out, values in [
        (torch.full((9, 3, 4), float("nan")), torch.randn(5, 3, 4)),
        (torch.full((9,), -1, dtype=torch.int64), torch.arange(5)),
        (torch.zeros(9, 2, dtype=torch.bool), torch.ones(5, 2, dtype=torch.bool)),
        (torch.full((4, 9, 3), float("nan")).transpose(0, 1), torch.randn(5, 4, 3)),  # strided out
        (torch.full((9, 2), float("nan")).half(), torch.randn(2, 5).half().t()),  # strided values
    ]:
        idx = torch.randperm(9)[:5]
        want = out.clone().index_copy_(0, idx, values)
        out = out.to(dev)
        got = lookfast.exit_scatter(out, idx.to(dev), values.to(dev))
        assert got is out and backend.ran("exit_scatter")
        assert torch.equal(out.cpu().nan_to_num(7), want.nan_to_num(7))
    empty = torch.zeros(3, 2, device=dev)
    lookfast.exit_scatter(empty, torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, 2, device=dev))
    assert empty.abs().sum() == 0


# ------------------------------------------------------------------------------------------- Triton (interpreter)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_triton_matches_reference(criterion, seed, monkeypatch):
    k = pytest.importorskip("lookfast.kernels.exit_compact")
    monkeypatch.setattr(k, "CONFIDENCE_BLOCK_MAX", 16)  # 37 classes -> 3 blocks: exercises the online merge
    monkeypatch.setattr(k, "COPY_BLOCK", 8)
    rng = random.Random(seed)
    for n, classes in [(7, 37), (1, 5), (6, 1), (0, 4)]:
        x = random_logits(n, classes, nan_rows=min(n, 1))
        states = [torch.randn(n, 3, 5), torch.randint(0, 9, (n, 3)), torch.rand(n, 3) > 0.5,
                  torch.randn(n, 4).half(), torch.randn(n, 6, 4)[:, ::2], torch.randn(n),
                  torch.randn(n, 3, 2, 5).contiguous(memory_format=torch.channels_last)]
        conf = ex.exit_confidence_reference(x, criterion)
        thr = threshold_between(conf, rng)
        want = ex.exit_compact_reference(x, thr, *states, criterion=criterion)
        keep, exited = k.exit_confidence_mask(x, torch.tensor(thr, dtype=torch.float64), ex.CRITERIA[criterion])
        assert keep.tolist() == want[0].tolist() and exited.tolist() == want[1].tolist()
        got = k.compact_rows(states, keep)
        assert_compact_equal(got, list(want[2:]))
        assert_layout(got[-1], "channels_last")
    x = torch.randn(5, 40, dtype=torch.float64)
    for crit in CRITERIA:  # float64 path
        thr = threshold_between(ex.exit_confidence_reference(x, crit), rng)
        want = ex.exit_compact_reference(x, thr, criterion=crit)
        got = k.exit_confidence_mask(x, torch.tensor(thr, dtype=torch.float64), ex.CRITERIA[crit])
        assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_triton_scatter(seed, monkeypatch):
    k = pytest.importorskip("lookfast.kernels.exit_compact")
    monkeypatch.setattr(k, "COPY_BLOCK", 8)
    for out, values in [(torch.full((7, 3, 3), float("nan")), torch.randn(4, 3, 3)),
                        (torch.full((7,), -1, dtype=torch.int64), torch.arange(4)),
                        (torch.zeros(7, 5, dtype=torch.bool), torch.ones(4, 5, dtype=torch.bool))]:
        idx = torch.randperm(7)[:4]
        want = out.clone().index_copy_(0, idx, values)
        k.exit_scatter(out, idx, values)
        assert torch.equal(out.nan_to_num(7), want.nan_to_num(7))


def test_triton_custom_ops(seed):
    """The GPU entry points (custom ops around the Triton launchers: fake kernels, autograd, mutation) on CPU
    tensors under the interpreter."""
    pytest.importorskip("lookfast.kernels.exit_compact")
    mask_op, compact_op, scatter_op = (torch.ops.lookfast.exit_confidence_mask_triton,
                                       torch.ops.lookfast.compact_rows_triton, torch.ops.lookfast.exit_scatter_triton)
    x = torch.randn(6, 5)
    thr = torch.tensor(threshold_between(ex.exit_confidence_reference(x, "margin"), random.Random(seed)),
                       dtype=torch.float64)
    keep, exited = mask_op(x, thr, ex.CRITERIA["margin"])
    want = ex.exit_compact_reference(x, thr, criterion="margin")
    assert keep.tolist() == want[0].tolist() and exited.tolist() == want[1].tolist()
    torch.library.opcheck(mask_op, (x, thr, 2), test_utils=("test_schema", "test_faketensor"))
    a = torch.randn(6, 3, requires_grad=True)
    torch.library.opcheck(compact_op, ([a, torch.randint(0, 5, (6, 2))], torch.tensor([1, 4])))
    (c,) = compact_op([a], torch.tensor([1, 4]))
    c.sum().backward()
    assert a.grad[:, 0].tolist() == [0, 1, 0, 0, 1, 0]
    out = torch.zeros(6, 3)
    torch.library.opcheck(scatter_op, (out, torch.tensor([5, 0]), torch.ones(2, 3)))
    scatter_op(out, torch.tensor([5, 0]), torch.ones(2, 3))
    assert out.sum(1).tolist() == [3, 0, 0, 0, 0, 3]


# ------------------------------------------------------------------------------- autograd, opcheck, torch.compile
@needs_cpp
def test_gradients_flow_to_kept_rows(seed):
    x = torch.randn(6, 4, dtype=torch.float64)
    thr = threshold_between(ex.exit_confidence_reference(x, "max_softmax"), random.Random(seed))
    a = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: tuple(lookfast.exit_compact(x, thr, a, b)[2:]), (a, b))
    keep, _, ca, idx = lookfast.exit_compact(x, thr, a, torch.arange(6))
    (ca * 2).sum().backward()
    want = torch.zeros(6, 3, dtype=torch.float64)
    want[keep] = 2
    assert torch.equal(a.grad, want)


@needs_cpp
def test_opcheck():
    x = torch.randn(11, 9)
    x[2, 0] = float("nan")
    for crit in range(3):
        torch.library.opcheck(torch.ops.lookfast.exit_confidence_mask.default, (x, torch.tensor(0.3), crit),
                              test_utils=("test_schema", "test_faketensor"))
    keep = torch.tensor([0, 3, 4, 10])
    states = [torch.randn(11, 3, requires_grad=True), torch.randint(0, 5, (11, 2)), torch.randn(11, 2, 2),
              torch.randn(11, 3, 2, 2).contiguous(memory_format=torch.channels_last)]  # the fake keeps its layout too
    torch.library.opcheck(torch.ops.lookfast.compact_rows.default, (states, keep))
    torch.library.opcheck(torch.ops.lookfast.compact_rows_backward.default, ([torch.randn(4, 3)], keep, 11))
    torch.library.opcheck(torch.ops.lookfast.exit_scatter.default, (torch.zeros(11, 3), keep, torch.randn(4, 3)))


@needs_cpp
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    import torch._dynamo.config as dcfg

    def step(logits, a, b, threshold):
        keep, exited, ca, cb = lookfast.exit_compact(logits, threshold, a, b, criterion="margin")
        return keep, exited, ca * 2, cb

    x, a, b = torch.randn(10, 7), torch.randn(10, 3), torch.randint(0, 9, (10, 2))
    with dcfg.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend="inductor")
        for thr in (0.2, 0.5):
            got, want = compiled(x, a, b, torch.tensor(thr)), step(x, a, b, torch.tensor(thr))
            assert all(torch.equal(g, w) for g, w in zip(got, want))


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.cpu_kernel
@needs_cpp
def test_bad_inputs_name_the_argument():
    x, s = torch.randn(5, 4), torch.randn(5, 2)
    cases = [
        (lambda: lookfast.exit_compact(x, 0.5, torch.randn(4, 2)), ValueError, "states[0]"),
        (lambda: lookfast.exit_compact(x, 0.5, s, torch.randn(6)), ValueError, "states[1]"),
        (lambda: lookfast.exit_compact(x, 0.5, s, criterion="softmax"), ValueError, "criterion"),
        (lambda: lookfast.exit_compact(x, torch.tensor([0.5, 0.2]), s), ValueError, "threshold"),
        (lambda: lookfast.exit_compact(x, "0.5", s), TypeError, "threshold"),
        (lambda: lookfast.exit_compact(x[0], 0.5), ValueError, "logits"),
        (lambda: lookfast.exit_compact(x.long(), 0.5), TypeError, "logits"),
        (lambda: lookfast.exit_compact(torch.randn(5, 0), 0.5), ValueError, "logits"),
        (lambda: lookfast.exit_compact(x, 0.5, 3), TypeError, "states[0]"),
        (lambda: lookfast.exit_scatter(s, torch.tensor([0, 1], dtype=torch.int32), s[:2]), TypeError, "batch_index"),
        (lambda: lookfast.exit_scatter(s, torch.tensor([0, 1]), s[:3]), ValueError, "batch_index"),
        (lambda: lookfast.exit_scatter(s, torch.tensor([0, 1]), torch.randn(2, 3)), ValueError, "values"),
        (lambda: lookfast.exit_scatter(s, torch.tensor([0, 1]), s[:2].double()), TypeError, "values"),
        (lambda: lookfast.exit_scatter(s, torch.tensor([0, 7]), s[:2].clone()), RuntimeError, "batch_index"),
        (lambda: lookfast.calibrate_thresholds(torch.randn(3, 4, 5), [0.5, 0.4, 0.2]), ValueError, "proportions"),
        (lambda: lookfast.calibrate_thresholds(torch.randn(3, 4, 5), [0.5, 0.5]), ValueError, "proportions"),
        (lambda: lookfast.calibrate_thresholds(torch.randn(4, 5), [0.5, 0.5]), ValueError, "exit_logits"),
        (lambda: lookfast.budget_proportions(0, 0.5), ValueError, "num_exits"),
        (lambda: lookfast.budget_proportions(3, -1.0), ValueError, "q"),
        (lambda: lookfast.expected_cost([0.5, 0.5], [1, 2, 3]), ValueError, "exit_costs"),
        (lambda: lookfast.EarlyExitRunner([lambda s: s], []), ValueError, "heads"),
        (lambda: lookfast.EarlyExitRunner([lambda s: s], [lambda s: s[0]], criterion="x"), ValueError, "criterion"),
        (lambda: lookfast.EarlyExitRunner([lambda s: s], [lambda s: s[0]])((x,), [0.5, 0.5]), ValueError,
         "thresholds"),
    ]
    for fn, error, name in cases:
        with pytest.raises(error, match=name.replace("[", r"\[").replace("]", r"\]")):
            fn()
    with pytest.raises(RuntimeError, match="keep"):  # the C++ op itself refuses out-of-range rows
        torch.ops.lookfast.compact_rows([s], torch.tensor([0, 5]))


# ------------------------------------------------------------------------------------------ AOT Triton compile
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpus_without_spills(arch):
    pytest.importorskip("triton")
    from triton_aot import compile_report

    module = "lookfast.kernels.exit_compact"
    jobs = [
        ("exit_confidence_kernel",
         {"logits_ptr": "*fp32", "stride_row": "i64", "stride_col": "i64", "n_cols": "i32", "threshold_ptr": "*fp64",
          "passes_ptr": "*i32", "CRITERION": "constexpr", "FP64": "constexpr", "BLOCK": "constexpr"},
         {"CRITERION": 2, "FP64": False, "BLOCK": 1024}, 4),  # C = 1000 (ImageNet): one block
        ("exit_confidence_kernel",
         {"logits_ptr": "*fp16", "stride_row": "i64", "stride_col": "i64", "n_cols": "i32", "threshold_ptr": "*fp64",
          "passes_ptr": "*i32", "CRITERION": "constexpr", "FP64": "constexpr", "BLOCK": "constexpr"},
         {"CRITERION": 1, "FP64": False, "BLOCK": 2048}, 8),  # the largest block, 8 warps
        ("exit_positions_kernel",
         {"passes_ptr": "*i32", "inclusive_ptr": "*i32", "keep_ptr": "*i64", "exited_ptr": "*i64", "n": "i32",
          "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4),
        ("copy_rows_kernel",
         {"src_ptr": "*i32", "dst_ptr": "*i32", "index_ptr": "*i64", "src_row_stride": "i64", "dst_row_stride": "i64",
          "row_elems": "i64", "index_bound": "i64", "SCATTER": "constexpr", "BLOCK": "constexpr"},
         {"SCATTER": False, "BLOCK": 2048}, 4),
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:  # each compile is its own subprocess
        reports = list(pool.map(lambda job: compile_report(module, job[0], job[1], job[2], arch, num_warps=job[3]),
                                jobs))
    for (kernel, *_), report in zip(jobs, reports):
        assert report["spill_stores"] == 0 and report["spill_loads"] == 0, (kernel, report["ptxas"][-500:])


# ------------------------------------------------------------------------------------------------- GPU (skipped here)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_gpu_backends_match_reference(backend, criterion, seed, monkeypatch):
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", backend)
    monkeypatch.delenv("LOOKFAST_BACKEND", raising=False)
    if _backend.backend_for("exit_confidence_mask", torch.device("cuda")) != {"cuda": _backend.LIBRARY}.get(backend, backend):
        pytest.skip(f"no {backend} kernels in this install")
    rng = random.Random(seed)
    for n, classes, dtype in [(257, 1000, torch.float32), (33, 37, torch.float16), (1, 5, torch.float64),
                              (0, 3, torch.float32), (70000, 3, torch.float32)]:  # > 65535 rows: grid.y loops
        x = random_logits(n, classes, dtype, nan_rows=min(n, 2))
        states = odd_states(n)
        conf = exit_confidence_f64(x.double(), criterion) if n < 1000 else ex.exit_confidence_reference(x, criterion).double()
        thr = threshold_between(conf, rng, 1e-2 if dtype == torch.float16 else 1e-5)
        want = ex.exit_compact_reference(x, thr, *states, criterion=criterion)
        got = lookfast.exit_compact(x.cuda(), thr, *(s.cuda() for s in states), criterion=criterion)
        assert_compact_equal([g.cpu() for g in got], list(want))
        out = torch.full((n + 3, 3, 5), float("nan"), device="cuda")
        idx = torch.randperm(n + 3)[:n].cuda()
        lookfast.exit_scatter(out, idx, states[0].cuda())
        assert torch.equal(out[idx].cpu(), states[0])
