"""`EarlyExitRunner`: real early exiting for a batch. After each exit head the samples whose confidence passes the
exit's threshold leave, and every later stage runs only on the survivors (docs/ops.md section 3).

How a model describes itself (the contract):

- A *state* is a tuple. Every tensor in it has the current samples as its first dimension (n_i rows at stage i);
  its other entries (None, numbers, strings, ...) pass through unchanged. Tensors shared by all samples (weights,
  position tables) belong in the callables' closures or modules, not in the state.
- ``stages`` is a sequence of E callables; ``stages[i](state) -> state``. ``stages[0]`` receives the inputs tuple
  given to the runner (a single tensor is taken as a 1-tuple); a stage may return a single tensor (taken as a
  1-tuple) and may change the tuple's length and contents freely.
- ``heads`` is a sequence of E callables; ``heads[i](state)`` returns either ``logits`` (n_i, classes) or
  ``(logits, state)``. In the second form the returned state replaces the one ``stages[i + 1]`` (and the compaction)
  sees: this is how a later exit uses an earlier exit's logits, e.g. ``return logits, state + (logits,)`` puts
  exit i's logits into the state; they are compacted with it and reach ``stages[i + 1]`` and ``heads[i + 1]``.
- Exit i is taken after ``stages[i]`` then ``heads[i]``. Every head returns the same number of classes.
- ``runner(inputs, thresholds)``: thresholds holds E numbers (a sequence or an (E,) tensor); the last is ignored
  because the last exit takes every sample still running. A sample leaves at the first exit i < E - 1 whose
  confidence passes ``thresholds[i]`` under the runner's criterion ("max_softmax" / "margin": confidence >=
  threshold; "entropy": entropy <= threshold); NaN confidence never passes. Returns ``(logits, exit_index)``:
  logits (B, classes) of the exit each sample took, in batch order, and exit_index (B,) int64.

The result is what running each sample alone through the stages and heads, stopping at its first passing exit,
gives (to float tolerance: batched kernels may round differently from one-sample ones). When every sample has left,
the remaining stages do not run. An exit whose threshold nobody can pass (+inf; "entropy": -inf) computes no
confidence at all. An exit that nobody passes copies nothing (the state goes on as it is); one that
everybody passes copies nothing either (the logits are written out as they are). Callables must treat samples independently (no batch statistics: eval-mode
BatchNorm is fine). Each exit costs one host synchronisation on a GPU (the survivor count sizes the next stage).
The returned logits take the dtype of heads[0]'s logits (later heads' logits are cast to it).

Example, a Dyn-Perceiver-like model (CNN features x, latent z; the last exit also reads exit 3's logits)::

    def stage1(s):  return cnn1(s[0]), z0.expand(s[0].shape[0], -1, -1)   # inputs (images,) -> (x, z)
    def stage2(s):  x = cnn2(s[0]); return x, x2z(x, s[1])
    def head_z(s):  return classifier_z(s[1])                              # logits; the state is unchanged
    def head3(s):   y = classifier_z(s[1]); return y, s + (y,)             # (logits, state + exit 3's logits)
    def head4(s):   return merge(cnn_head(s[0]), s[2])                     # s[2]: exit 3's logits, compacted
    runner = EarlyExitRunner([stage1, stage2, stage3, stage4], [head_z, head_z, head3, head4])
    logits, exit_index = runner((images,), thresholds)
"""
from __future__ import annotations

import math

from typing import Any, Callable, Sequence

import torch

from .._validate import require_float_list
from .calibration import budget_proportions, calibrate_thresholds, expected_cost
from ..ops.exit_compact import compact_rows, criterion_code, exit_compact, exit_scatter

# The early-exit family's public names (lookfast/__init__.py re-exports them from here).
__all__ = ["EarlyExitRunner", "exit_compact", "exit_scatter", "calibrate_thresholds", "budget_proportions",
           "expected_cost"]



def _as_state(value: Any, what: str) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    raise TypeError(f"{what} must return a tensor or a tuple (the state), got {type(value).__name__}")


def never_passes(criterion: str, threshold: float) -> bool:
    """True when no confidence can pass `threshold` under `criterion`: +inf for "max_softmax" and "margin"
    (confidence >= threshold; confidences are <= 1 or NaN), -inf for "entropy" (entropy <= threshold; entropies are
    >= 0 or NaN). The runner and lookfast.serving skip such an exit's confidence computation altogether (the
    documented way to say "nobody exits here" is exactly these values, e.g. a runner measured at 0 % exits)."""
    return threshold == (-math.inf if criterion == "entropy" else math.inf)


def _state_rows(state: tuple, n: int, i: int) -> list[int]:
    """Positions of the tensors in `state` (what compaction copies), after checking each has the n rows of the samples
    still running after heads[i]. Shared with lookfast.serving's multi-exit pipeline, which runs the same stages."""
    slots = [j for j, t in enumerate(state) if isinstance(t, torch.Tensor)]
    for j in slots:
        if state[j].dim() == 0 or state[j].shape[0] != n:
            raise ValueError(f"state[{j}] after heads[{i}] must have {n} rows (one per sample still running), "
                             f"got shape {tuple(state[j].shape)}")
    return slots


class EarlyExitRunner:
    """Runs a multi-exit model on a batch with real early exits. See the module docstring for the model contract.

    Args:
        stages: E callables, ``stages[i](state) -> state``.
        heads: E callables, ``heads[i](state) -> logits`` or ``-> (logits, state)``.
        criterion: "max_softmax" (default), "entropy" or "margin" (see `lookfast.exit_compact`).
    """

    def __init__(self, stages: Sequence[Callable], heads: Sequence[Callable], criterion: str = "max_softmax"):
        stages, heads = list(stages), list(heads)
        if not stages:
            raise ValueError("stages must hold at least one stage")
        if len(heads) != len(stages):
            raise ValueError(f"heads must hold one head per stage: {len(stages)} stages, got {len(heads)} heads")
        for name, fns in (("stages", stages), ("heads", heads)):
            for i, fn in enumerate(fns):
                if not callable(fn):
                    raise TypeError(f"{name}[{i}] must be callable, got {type(fn).__name__}")
        criterion_code(criterion)
        self.stages, self.heads, self.criterion = stages, heads, criterion

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def _thresholds(self, thresholds) -> list[float]:
        values = require_float_list("thresholds", thresholds, "one per exit")
        if len(values) != self.num_exits:
            raise ValueError(f"thresholds must hold {self.num_exits} values (one per exit), got {len(values)}")
        nan = [i for i, t in enumerate(values[:-1]) if math.isnan(t)]  # the last one is ignored
        if nan:
            raise ValueError(f"thresholds[{nan[0]}] is NaN: nobody would ever leave at that exit (no confidence "
                             "compares true with NaN); use +inf for an exit nobody takes")
        return values

    def _split_head(self, i: int, state: tuple) -> tuple[torch.Tensor, tuple]:
        out = self.heads[i](state)
        if isinstance(out, torch.Tensor):
            logits = out
        elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor):
            logits, state = out[0], _as_state(out[1], f"heads[{i}] (its state)")
        else:
            raise TypeError(f"heads[{i}] must return logits or (logits, state), got {type(out).__name__}")
        if logits.dim() != 2:
            raise ValueError(f"heads[{i}] must return logits of shape (n, classes), got {tuple(logits.shape)}")
        return logits, state

    def _run_exit(self, i: int, state: tuple, n: int) -> tuple[torch.Tensor, tuple]:
        """stages[i] then heads[i] on the state of the n samples still running: (logits (n, classes), state). The
        one place both this runner and lookfast.serving's multi-exit pipeline run a stage."""
        state = _as_state(self.stages[i](state), f"stages[{i}]")
        logits, state = self._split_head(i, state)
        if logits.shape[0] != n:
            raise ValueError(f"heads[{i}] returned {logits.shape[0]} rows of logits for {n} samples")
        return logits, state

    def __call__(self, inputs, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
        state = _as_state(inputs, "inputs")
        first = next((t for t in state if isinstance(t, torch.Tensor)), None)
        if first is None or first.dim() == 0:
            raise ValueError("inputs must contain a tensor whose first dimension is the batch")
        thr = self._thresholds(thresholds)
        batch, device, last = first.shape[0], first.device, self.num_exits - 1
        rows = torch.arange(batch, device=device)  # original batch position of each survivor
        exit_index = torch.full((batch,), last, dtype=torch.int64, device=device)
        out = None
        for i in range(self.num_exits):
            n = rows.shape[0]
            logits, state = self._run_exit(i, state, n)
            if out is None:
                out = logits.new_full((batch, logits.shape[1]), float("nan"))
            elif logits.shape[1] != out.shape[1]:
                raise ValueError(f"heads[{i}] returned {logits.shape[1]} classes, heads[0] returned {out.shape[1]}")
            if i == last:
                exit_scatter(out, rows, logits.to(out.dtype))
                break
            slots = _state_rows(state, n, i)
            if never_passes(self.criterion, thr[i]):
                continue  # nobody can leave: no confidences, the state goes on as it is
            keep, exited = exit_compact(logits, thr[i], criterion=self.criterion)
            if exited.shape[0] == 0:
                continue  # nobody left: the state stays as it is, no copy
            if exited.shape[0] == n:  # everybody leaves: their logits and rows as they are, no copy
                exit_scatter(out, rows, logits.to(out.dtype))
                exit_index.index_fill_(0, rows, i)
                break
            left_logits, left_rows = compact_rows([logits, rows], exited)
            exit_scatter(out, left_rows, left_logits.to(out.dtype))
            exit_index.index_fill_(0, left_rows, i)
            *compacted, rows = compact_rows([state[j] for j in slots] + [rows], keep)  # all states in one pass
            new_state = list(state)
            for j, t in zip(slots, compacted):
                new_state[j] = t
            state = tuple(new_state)
        return out, exit_index
