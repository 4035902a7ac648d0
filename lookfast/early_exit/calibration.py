"""Exit thresholds for a compute budget: the MSDNet / Dyn-Perceiver calibration (docs/ops.md section 3), the budget
proportions it is usually fed, and the expected cost of a budget.

Typical use::

    p = lookfast.budget_proportions(4, q)                    # share of samples leaving at each exit
    T = lookfast.calibrate_thresholds(val_logits, p)          # val_logits (E, n, classes), raw logits
    logits, exit_index = runner(inputs, T)                    # lookfast.EarlyExitRunner(..., "max_softmax")
    cost = lookfast.expected_cost(p, exit_costs)              # exit_costs[k]: cost of a sample leaving at exit k
"""
from __future__ import annotations

import math
import struct
from typing import Sequence

import torch

from .._validate import FLOAT_DTYPES, require_dtype, require_float_list
from ..ops.exit_compact import exit_confidence_reference


def _proportion_list(proportions, name: str = "proportions") -> list[float]:
    values = require_float_list(name, proportions, "one per exit")
    if any(not math.isfinite(p) or p < 0 for p in values):
        raise ValueError(f"{name} must be finite and >= 0, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got sum {sum(values):.9g}")
    return values


def _ordered_key(x: float, dtype: torch.dtype) -> int:
    """An int that orders floats of `dtype` as the floats order (adjacent floats: adjacent ints; -0.0 == 0.0)."""
    fmt, ifmt, sign = ("d", "q", 2**63) if dtype == torch.float64 else ("f", "i", 2**31)
    b = struct.unpack(ifmt, struct.pack(fmt, x))[0]
    return b if b >= 0 else -sign - b


def _from_key(key: int, dtype: torch.dtype) -> float:
    fmt, ifmt, sign = ("d", "q", 2**63) if dtype == torch.float64 else ("f", "i", 2**31)
    return struct.unpack(fmt, struct.pack(ifmt, key if key >= 0 else -sign - key))[0]


def _passes(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(n,) bool: the rows of `logits` (n, C) that leave at `threshold`, decided by `exit_compact` itself (the
    backend the runner uses: C++, CUDA, Triton or the reference), so calibration and runner share one confidence."""
    from ..ops.exit_compact import exit_compact

    _, exited = exit_compact(logits, threshold)
    mask = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    mask[exited] = True
    return mask


def _kth_confidence(logits: torch.Tensor, estimate: float, k: int, dtype: torch.dtype) -> float:
    """The k-th largest confidence of the rows of `logits` as `exit_compact` computes it, i.e. the largest float t
    (in `dtype`) with at least k rows passing `confidence >= t`. Found by bisection over the floats with the exit
    test itself, starting from a bracket around the reference's `estimate`; only rows whose outcome differs across
    the bracket are re-tested, so each step is cheap."""
    def count(rows: torch.Tensor, t: float) -> int:
        return int(_passes(rows, t).sum()) if rows.shape[0] else 0

    width = max(abs(estimate) * 1e-4, 1e-30)
    lo_t, hi_t = estimate - width, estimate + width
    p_lo, p_hi = _passes(logits, lo_t), _passes(logits, hi_t)
    if not (int(p_lo.sum()) >= k > int(p_hi.sum())):  # the backend is far from the reference: the whole range
        lo_t, hi_t = -math.inf, math.inf
        p_lo, p_hi = _passes(logits, lo_t), _passes(logits, hi_t)
    sure = int(p_hi.sum())  # pass at the top of the bracket, hence everywhere inside it
    candidates = logits[p_lo & ~p_hi]
    lo, hi = _ordered_key(lo_t, dtype), _ordered_key(hi_t, dtype)  # count(lo) >= k > count(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sure + count(candidates, _from_key(mid, dtype)) >= k:
            lo = mid
        else:
            hi = mid
    return _from_key(lo, dtype)


def calibrate_thresholds(exit_logits, proportions) -> torch.Tensor:
    """Per-exit max-softmax thresholds that make `proportions` of a calibration set leave at each exit.

    Args:
        exit_logits: (E, n, classes) raw logits of every exit on n calibration samples (or a sequence of E (n, C)).
        proportions: E numbers >= 0 summing to 1 (within 1e-6): the share of samples meant to leave at each exit.

    Returns:
        T, (E,) tensor in the confidences' dtype (float32, float64 for float64 logits). With confidence c[e, i] =
        max softmax probability of sample i at exit e, for each exit e < E - 1 in order: among the samples that did
        not leave at an earlier exit, sorted by c[e] descending (NaN last: NaN never leaves), T[e] is the confidence
        of the k-th (1-based), k = floor(n * proportions[e]); T[e] = +inf (nobody leaves) when k is 0 or exceeds
        the samples available. A sample leaves at the first e with c[e, i] >= T[e]; T[E - 1] = -inf. Samples tied
        with T[e] all leave, so ties can make more than k leave.

    Exactness: c[e, i] is the confidence `lookfast.exit_compact` computes on the logits' device (the C++ kernel on
    the CPU, the CUDA/Triton kernel on GPUs, the reference without the compiled library): T[e] is found with that
    exit test itself, so `EarlyExitRunner` (criterion "max_softmax", same device and backend) reproduces these exits
    bit for bit, whatever the batch composition (each row's confidence depends on that row only). The reference
    softmax (`exit_confidence_reference`) agrees with it to a few ulps.
    """
    if not isinstance(exit_logits, torch.Tensor):
        exit_logits = torch.stack(list(exit_logits))
    if exit_logits.dim() != 3:
        raise ValueError(f"exit_logits must be 3-D (exits, samples, classes), got shape {tuple(exit_logits.shape)}")
    require_dtype("exit_logits", exit_logits, FLOAT_DTYPES)
    exits, n, classes = exit_logits.shape
    if exits == 0 or classes == 0:
        raise ValueError(f"exit_logits needs at least one exit and one class, got shape {tuple(exit_logits.shape)}")
    p = _proportion_list(proportions)
    if len(p) != exits:
        raise ValueError(f"proportions must hold {exits} values (one per exit of exit_logits), got {len(p)}")
    conf = exit_confidence_reference(exit_logits.reshape(exits * n, classes)).reshape(exits, n)  # estimates
    thresholds = torch.empty(exits, dtype=conf.dtype)
    left = torch.zeros(n, dtype=torch.bool, device=conf.device)
    for e in range(exits - 1):
        k = math.floor(n * p[e])
        rows = exit_logits[e][~left]
        available = int(_passes(rows, -math.inf).sum()) if rows.shape[0] else 0  # NaN confidence never passes
        if k == 0 or k > available:
            thresholds[e] = math.inf
        else:
            c = conf[e][~left]
            c = c[~torch.isnan(c)]
            estimate = torch.sort(c, descending=True).values[min(k, c.shape[0]) - 1].item() if c.shape[0] else 0.0
            thresholds[e] = _kth_confidence(rows, estimate, k, conf.dtype)
        left |= _passes(exit_logits[e], thresholds[e].item())
    thresholds[exits - 1] = -math.inf
    return thresholds


def budget_proportions(num_exits: int, q: float) -> torch.Tensor:
    """(E,) float64 exit proportions proportional to q**k, k = 1..E, normalised to sum 1 (q > 0).

    q < 1 sends most samples out early (small budget), q > 1 keeps most to the end, q = 1 is uniform. Sweeping q
    (the MSDNet / Dyn-Perceiver procedure sweeps q over about 0.2 .. 5) traces the accuracy-cost curve.
    """
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits must be an int >= 1, got {num_exits!r}")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q <= 0:
        raise ValueError(f"q must be a finite number > 0, got {q!r}")
    w = torch.tensor([float(q) ** k for k in range(1, num_exits + 1)], dtype=torch.float64)
    if not torch.isfinite(w).all() or w.sum() == 0:  # q ** k overflowed or underflowed: work in logs
        w = torch.softmax(torch.arange(1, num_exits + 1, dtype=torch.float64) * math.log(q), 0)
    return w / w.sum()


def expected_cost(proportions, exit_costs: Sequence[float]) -> torch.Tensor:
    """Expected cost per sample: sum_k proportions[k] * exit_costs[k].

    Args:
        proportions: (E,) exit proportions summing to 1, or (K, E) for K budgets (each row sums to 1).
        exit_costs: E numbers, exit_costs[k] = the total cost (MACs, FLOPs, seconds) of a sample that leaves at
            exit k, i.e. cumulative over stages 0..k and heads 0..k (the Dyn-Perceiver `flops.txt` convention).
    Returns: a 0-d float64 tensor, or (K,) for K budgets.
    """
    costs = torch.as_tensor([float(c) for c in exit_costs], dtype=torch.float64)
    p = torch.as_tensor(proportions, dtype=torch.float64)
    if p.dim() not in (1, 2):
        raise ValueError(f"proportions must be (E,) or (budgets, E), got shape {tuple(p.shape)}")
    for row in p.reshape(-1, p.shape[-1]):
        _proportion_list(row)
    if p.shape[-1] != costs.shape[0]:
        raise ValueError(f"exit_costs must hold {p.shape[-1]} values (one per exit), got {costs.shape[0]}")
    return p @ costs
