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
        with T[e] all leave, so ties can make more than k leave. The thresholds are values of the confidences
        themselves, so `EarlyExitRunner` with criterion "max_softmax" reproduces these exits exactly.
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
    conf = exit_confidence_reference(exit_logits.reshape(exits * n, classes)).reshape(exits, n)
    thresholds = torch.empty(exits, dtype=conf.dtype)
    left = torch.zeros(n, dtype=torch.bool, device=conf.device)
    for e in range(exits - 1):
        k = math.floor(n * p[e])
        c = conf[e][~left]
        c = c[~torch.isnan(c)]
        if k == 0 or k > c.shape[0]:
            thresholds[e] = math.inf
        else:
            thresholds[e] = torch.sort(c, descending=True).values[k - 1].item()
        left |= conf[e] >= thresholds[e].to(conf.device)
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
