"""EarlyExitRunner and calibrate_thresholds (lookfast.early_exit), built on the exit_compact op: the runner against
one-sample-at-a-time execution, the calibration against a hand-computed case and a brute force."""
from __future__ import annotations

import math
import random

import pytest
import torch

import lookfast
from lookfast.ops import exit_compact as ex
from oracles import threshold_between

CRITERIA = ["max_softmax", "entropy", "margin"]


def exits_taken(exit_logits, thresholds) -> torch.Tensor:
    """(n,) int64: the exit each sample of `exit_logits` (E, n, classes) takes under max-softmax `thresholds` (E,):
    the first exit whose confidence reaches its threshold, decided by `exit_compact` (the runner's own exit test)."""
    if not isinstance(exit_logits, torch.Tensor):
        exit_logits = torch.stack(list(exit_logits))
    exits, n, classes = exit_logits.shape
    t = torch.as_tensor(thresholds, dtype=torch.float64).reshape(exits).tolist()
    passes = torch.ones(exits, n, dtype=torch.bool)
    for e in range(exits - 1):
        passes[e] = False
        passes[e][lookfast.exit_compact(exit_logits[e], t[e])[1]] = True
    return passes.to(torch.int64).argmax(0)


# ---------------------------------------------------------------------------------------------- EarlyExitRunner
def rowwise_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w with each row's sum in one fixed order, whatever the batch: a BLAS GEMM blocks rows differently for 30
    rows than for 40, so a sample's logits could move by an ulp when the runner compacts the batch, and a confidence
    equal to its calibrated threshold could fall just below it (seen: 12 of 2600 seeds)."""
    return (a.unsqueeze(-1) * w).sum(-2)


def toy_model(classes: int = 5, width: int = 6, exits: int = 4):
    """Stages on a free-form state (features, integer tags, a conv map, a bool flag); head i > 0 also reads exit
    i - 1's logits, which head i - 1 put into the state. Every row is computed as it would be alone (batch-invariant
    products), as a real model's exits are assumed to be by the tests that compare exits exactly."""
    g = torch.Generator().manual_seed(1234)
    ws = [torch.randn(width, width, generator=g) / width**0.5 for _ in range(exits)]
    hs = [torch.randn(width + (classes if i else 0), classes, generator=g) * 2 for i in range(exits)]
    conv = torch.randn(2, 2, 3, 3, generator=g) / 3

    def stage(i):
        def run(state):
            feat, tags, fmap, flag = state[:4]
            fmap = torch.nn.functional.conv2d(fmap, conv, padding=1).tanh()
            feat = torch.tanh(rowwise_matmul(feat, ws[i]) + fmap.mean((1, 2, 3))[:, None])
            return (feat, tags + 1, fmap, flag) + tuple(state[4:5])  # keeps the previous exit's logits
        return run

    def head(i):
        def run(state):
            inp = state[0] if i == 0 else torch.cat([state[0], state[4]], 1)
            logits = rowwise_matmul(inp, hs[i])
            return logits, tuple(state[:4]) + (logits,)
        return run

    return [stage(i) for i in range(exits)], [head(i) for i in range(exits)]


def toy_inputs(batch: int, width: int = 6):
    return (torch.randn(batch, width), torch.arange(batch) * 10, torch.randn(batch, 2, 5, 3),
            torch.rand(batch) > 0.5)


def run_alone(stages, heads, inputs, thresholds, criterion):
    """The oracle: one sample at a time, every stage in order, stop at the first passing exit."""
    outs, taken = [], []
    for b in range(inputs[0].shape[0]):
        state = tuple(t[b:b + 1] for t in inputs)
        for i in range(len(stages)):
            state = stages[i](state)
            logits, state = heads[i](state)
            if i == len(stages) - 1 or bool(ex.exit_mask_reference(logits, thresholds[i], criterion)[0]):
                outs.append(logits[0])
                taken.append(i)
                break
    return torch.stack(outs), torch.tensor(taken)


def exit_confidences(stages, heads, inputs, criterion):
    state, confs = inputs, []
    for st, hd in zip(stages, heads):
        logits, state = hd(st(state))
        confs.append(ex.exit_confidence_reference(logits, criterion))
    return confs


@pytest.mark.parametrize("criterion", CRITERIA)
def test_runner_matches_one_sample_at_a_time(criterion, seed):
    rng = random.Random(seed)
    stages, heads = toy_model()
    runner = lookfast.EarlyExitRunner(stages, heads, criterion=criterion)
    for batch in (13, 1):
        inputs = toy_inputs(batch)
        if batch > 1:
            inputs[0][3] = float("nan")  # NaN all the way: never exits early, leaves at the last exit
        confs = exit_confidences(stages, heads, inputs, criterion)
        for _ in range(3):
            thresholds = [threshold_between(c, rng) for c in confs[:-1]] + [0.0]
            want_logits, want_exit = run_alone(stages, heads, inputs, thresholds, criterion)
            logits, exit_index = runner(inputs, thresholds)
            assert exit_index.dtype == torch.int64 and exit_index.tolist() == want_exit.tolist()
            # batched and one-sample convolutions round differently (a few 1e-5 at worst in float32)
            torch.testing.assert_close(logits, want_logits, equal_nan=True, rtol=1e-4, atol=1e-4)
            if batch > 1:
                assert exit_index[3] == len(stages) - 1


def test_runner_all_none_and_skipped_stages():
    stages, heads = toy_model()
    calls = []
    counted = [lambda s, f=f: (calls.append(s[0].shape[0]), f(s))[1] for f in stages]
    runner = lookfast.EarlyExitRunner(counted, heads)
    inputs = toy_inputs(9)
    logits, exit_index = runner(inputs, [-1.0, -1.0, -1.0, -1.0])  # everyone leaves at exit 0
    assert exit_index.tolist() == [0] * 9 and calls == [9]
    want, _ = run_alone(stages, heads, inputs, [-1.0] * 4, "max_softmax")
    torch.testing.assert_close(logits, want)
    calls.clear()
    logits, exit_index = runner(inputs, torch.tensor([2.0, 2.0, 2.0, 0.0]))  # nobody leaves early
    assert exit_index.tolist() == [3] * 9 and calls == [9, 9, 9, 9]
    confs = exit_confidences(stages, heads, inputs, "max_softmax")
    thr0 = sorted(confs[0].tolist())[4] - 1e-6  # 5 leave at exit 0; the rest never early
    calls.clear()
    _, exit_index = runner(inputs, [thr0, 2.0, 2.0, 2.0])
    assert calls == [9, 4, 4, 4] and (exit_index == 0).sum() == 5


@pytest.mark.parametrize("criterion", CRITERIA)
def test_runner_computes_no_confidence_at_an_exit_nobody_can_pass(monkeypatch, criterion):
    """+inf ("entropy": -inf) is the documented "nobody exits here": no exit_compact call at such an exit, and the
    results are those of running every stage (the oracle). A finite unreachable threshold still computes the
    confidence (the skip is exact, not a guess about which finite values are reachable)."""
    import lookfast.early_exit.runner as runner_module

    calls = []
    real = runner_module.exit_compact
    monkeypatch.setattr(runner_module, "exit_compact", lambda *a, **k: calls.append(1) or real(*a, **k))
    stages, heads = toy_model()
    runner = lookfast.EarlyExitRunner(stages, heads, criterion=criterion)
    inputs = toy_inputs(7)
    inputs[0][2] = float("nan")
    never = -math.inf if criterion == "entropy" else math.inf
    want_logits, want_exit = run_alone(stages, heads, inputs, [never] * 3 + [0.0], criterion)
    logits, exit_index = runner(inputs, [never, never, never, 0.0])
    assert calls == [] and exit_index.tolist() == want_exit.tolist() == [3] * 7
    torch.testing.assert_close(logits, want_logits, equal_nan=True, rtol=1e-4, atol=1e-4)
    finite = -1.0 if criterion == "entropy" else 2.0  # also unreachable, but not the documented value: computed
    _, exit_index = runner(inputs, [never, finite, never, 0.0])
    assert calls == [1] and exit_index.tolist() == [3] * 7
    # The opposite infinity is "everybody passes" under this criterion: computed, and everybody leaves at exit 0.
    _, exit_index = runner(inputs, [-never, never, never, 0.0])
    assert calls == [1, 1] and exit_index.tolist() == [0, 0, 3, 0, 0, 0, 0]
    assert runner_module.never_passes(criterion, never) and not runner_module.never_passes(criterion, -never)


def test_runner_single_tensor_state_and_head_forms():
    w = torch.randn(4, 3)
    runner = lookfast.EarlyExitRunner([lambda s: s[0] * 2, lambda s: s[0] + 1], [lambda s: s[0] @ w] * 2)
    x = torch.randn(6, 4)
    logits, exit_index = runner(x, [0.7, 0.0])
    want, taken = run_alone([lambda s: (s[0] * 2,), lambda s: (s[0] + 1,)],
                            [lambda s: (s[0] @ w, s)] * 2, (x,), [0.7, 0.0], "max_softmax")
    assert exit_index.tolist() == taken.tolist()
    torch.testing.assert_close(logits, want)


# ----------------------------------------------------------------------------------------- calibrate_thresholds
def brute_force_thresholds(exit_logits, proportions):
    """Independent: plain Python lists, the sort done by hand, conf computed from float64 exps."""
    exits, n, _ = exit_logits.shape
    conf = [[max(math.exp(v - max(row)) for v in row) / sum(math.exp(v - max(row)) for v in row)
             for row in exit_logits[e].double().tolist()] for e in range(exits)]
    gone = [False] * n
    out = []
    for e in range(exits - 1):
        k = math.floor(n * proportions[e])
        avail = sorted((conf[e][i] for i in range(n) if not gone[i]), reverse=True)
        t = math.inf if k == 0 or k > len(avail) else avail[k - 1]
        out.append(t)
        gone = [gone[i] or conf[e][i] >= t for i in range(n)]
    return out + [-math.inf]


def test_runner_keeps_channels_last_states(seed):
    # CNN activations in channels_last stay channels_last for the later stages (compact_rows keeps dense-block rows'
    # layout): a contiguous copy would send every later convolution down oneDNN's slower NCHW path.
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(9, 4, 3, 5, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4 * 3 * 5, 3, generator=g)
    seen = []

    def stage(state):
        seen.append(state[0].is_contiguous(memory_format=torch.channels_last))
        return (state[0] * 2,)  # elementwise ops keep channels_last

    heads = [lambda s: s[0].flatten(1) @ w] * 3
    first = ((images * 2).flatten(1) @ w).softmax(-1).amax(-1)
    t = first.median().item()  # about half the samples leave at exit 1
    logits, exit_index = lookfast.EarlyExitRunner([stage] * 3, heads)((images,), [t, 1.0, 0.0])
    seen_first = seen.pop(0)
    assert seen_first
    assert 0 < int((exit_index == 0).sum()) < 9 and (exit_index > 0).any()  # some samples went on
    assert seen == [True, True]  # stages 2 and 3 ran on compacted survivors
    want = torch.stack([(images * 2 ** (i + 1)).flatten(1) @ w for i in range(3)])[exit_index, torch.arange(9)]
    torch.testing.assert_close(logits, want)


def test_calibrate_hand_computed():
    # 2 classes, logits (0, z): max softmax = sigmoid(|z|). n = 4, proportions (0.5, 0.25, 0.25).
    z = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.2, 4.0, 1.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    logits = torch.stack([torch.zeros_like(z), z], -1)
    t = lookfast.calibrate_thresholds(logits, [0.5, 0.25, 0.25])
    sig = lambda v: 1 / (1 + math.exp(-v))
    # exit 0: k = 2, sorted (3, 2, 1, 0.5) -> T0 = sig(2): samples 0, 2 leave.
    # exit 1: k = 1, left {1, 3} with z (4.0, 0.1) -> T1 = sig(4): sample 1 leaves. Exit 2 takes sample 3.
    assert t.tolist() == pytest.approx([sig(2.0), sig(4.0), -math.inf], rel=1e-6)
    assert exits_taken(logits, t).tolist() == [0, 1, 0, 2]
    zero = lookfast.calibrate_thresholds(logits, [0.0, 0.2, 0.8])  # floor(4 * 0.2) = 0: nobody leaves early
    assert zero[0] == math.inf and zero[1] == math.inf and zero[2] == -math.inf


def test_calibrate_matches_brute_force_and_realises_floor_counts(seed):
    for exits, n, classes in [(4, 97, 10), (3, 50, 7), (2, 1, 3)]:
        logits = torch.randn(exits, n, classes) * 2
        q = random.Random(seed).choice([0.3, 0.7, 1.0, 2.0])
        p = lookfast.budget_proportions(exits, q).tolist()
        t = lookfast.calibrate_thresholds(logits, p)
        assert t.tolist() == pytest.approx(brute_force_thresholds(logits, p), rel=1e-6)
        counts = torch.bincount(exits_taken(logits, t), minlength=exits).tolist()
        floors = [math.floor(n * pe) for pe in p[:-1]]
        for e in range(exits - 1):  # random floats: no ties, so exactly floor(n p_e) leave (when enough remain)
            assert counts[e] == (floors[e] if floors[e] <= n - sum(counts[:e]) else 0)
        assert sum(counts) == n


def test_calibrated_thresholds_drive_the_runner_exactly():
    stages, heads = toy_model(exits=3)
    inputs = toy_inputs(40)
    state, per_exit = inputs, []
    for st, hd in zip(stages, heads):
        logits, state = hd(st(state))
        per_exit.append(logits)
    p = [0.25, 0.5, 0.25]
    t = lookfast.calibrate_thresholds(torch.stack(per_exit), p)
    # No slack: the thresholds are confidences as exit_compact computes them, so the runner reproduces them exactly.
    _, exit_index = lookfast.EarlyExitRunner(stages, heads)(inputs, t)
    assert torch.bincount(exit_index, minlength=3).tolist() == [10, 20, 10]


def test_budget_and_expected_cost():
    p = lookfast.budget_proportions(4, 0.5)
    assert p.tolist() == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    assert lookfast.budget_proportions(3, 1.0).tolist() == pytest.approx([1 / 3] * 3)
    assert float(lookfast.budget_proportions(5, 1e-300).sum()) == pytest.approx(1.0)
    assert float(lookfast.expected_cost(p, [1, 2, 3, 4])) == pytest.approx((8 + 8 + 6 + 4) / 15)
    both = lookfast.expected_cost(torch.stack([p, lookfast.budget_proportions(4, 2.0)]), [1, 2, 3, 4])
    assert both.shape == (2,) and float(both[1]) == pytest.approx((2 + 8 + 24 + 64) / 30)
