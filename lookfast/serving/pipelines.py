"""How the engine runs one model: as an ordered list of stages, each taking a batch of rows (one row per image) and
returning which rows are finished (with their logits) and the state of the rows that go on to the next stage.

- `MultiExitPipeline`: a multi-exit model (Dyn-Perceiver, or any `EarlyExitRunner` stages + heads). Stage i runs
  `stages[i]` then `heads[i]`; rows whose confidence passes `thresholds[i]` finish at exit i, the rest go on. The
  survivors' states are compacted in one pass, and not at all when nobody (or everybody) leaves.
- `LookWherePipeline`: stage 0 runs the selector on a batch of images and fixes each image's k (int, or from
  k_mass); stage 1 runs the extractor on a token-budgeted pack of images with different k (varlen attention).
- A plain callable `model(images) -> logits (B, C)` is a one-stage multi-exit model with no early exit.

Batches are sized in units: one unit per image in every stage, except LookWhere's extractor stage, where an image
costs its token count (prefix + k) and a batch holds up to `max_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..early_exit.runner import EarlyExitRunner, _as_state
from ..ops.exit_compact import compact_rows, exit_compact


@dataclass
class StepResult:
    """What one stage did to a batch of n rows.

    done: positions (within the batch) of the rows that finished here, with `logits` (len(done), ...) in that order,
          `exit_index` (the exit they took) and `k` (one int per finished row, or None).
    keep: positions of the rows that go on (None: every row goes on), with `state` (their rows, in keep order).
    """

    done: list[int]
    logits: torch.Tensor | None
    exit_index: int
    k: list[int] | None
    keep: list[int] | None
    state: tuple | None


def _tensor_rows(state: tuple, n: int, what: str) -> list[int]:
    slots = [j for j, t in enumerate(state) if isinstance(t, torch.Tensor)]
    for j in slots:
        if state[j].dim() == 0 or state[j].shape[0] != n:
            raise ValueError(f"{what}: state[{j}] must have {n} rows (one per sample still running), "
                             f"got shape {tuple(state[j].shape)}")
    return slots


class MultiExitPipeline:
    """Stages and heads as `EarlyExitRunner` describes them (see lookfast/early_exit/runner.py)."""

    kind = "multi_exit"

    def __init__(self, runner: EarlyExitRunner, thresholds, max_batch: int):
        self.runner = runner
        self.num_stages = runner.num_exits
        self.thresholds = None if thresholds is None else runner._thresholds(thresholds)
        self.max_batch = max_batch

    def capacity(self, stage: int) -> int:
        return self.max_batch

    def weights(self, stage: int, state: tuple, n: int) -> list[int]:
        return [1] * n

    def run(self, stage: int, state: tuple, n: int) -> StepResult:
        runner, last = self.runner, self.num_stages - 1
        state = _as_state(runner.stages[stage](state), f"stages[{stage}]")
        logits, state = runner._split_head(stage, state)
        if logits.shape[0] != n:
            raise ValueError(f"heads[{stage}] returned {logits.shape[0]} rows of logits for {n} samples")
        if stage == last:
            return StepResult(list(range(n)), logits, stage, None, [], None)
        slots = _tensor_rows(state, n, f"after heads[{stage}]")
        if self.thresholds is None:
            return StepResult([], None, stage, None, None, state)
        keep, exited = exit_compact(logits, self.thresholds[stage], criterion=runner.criterion)
        m = exited.shape[0]
        if m == 0:  # nobody leaves: the state goes on as it is, no copy
            return StepResult([], None, stage, None, None, state)
        if m == n:  # everybody leaves: nothing to carry on
            return StepResult(list(range(n)), logits, stage, None, [], None)
        left = logits.index_select(0, exited)
        compacted = compact_rows([state[j] for j in slots], keep)  # every state in one pass
        new_state = list(state)
        for j, t in zip(slots, compacted):
            new_state[j] = t
        return StepResult(exited.tolist(), left, stage, None, keep.tolist(), tuple(new_state))


class LookWherePipeline:
    """LookWhere in two stages: selector (fixes k per image), then the extractor on packed ragged tokens.

    The computation is the model's own (`LookWhere.forward_with_intermediates` split at the point where k is known),
    so each image's result equals `model(image[None], k=..., k_mass=..., ...)` run alone."""

    kind = "lookwhere"
    num_stages = 2

    def __init__(self, model, k, k_mass, k_min: int, k_max: int | None, max_batch: int, max_tokens: int | None):
        self.model = model
        n = model.grid * model.grid
        if k is not None and k_mass is not None:
            raise ValueError("give either k or k_mass, not both")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int):
                raise TypeError(f"k must be an int (one k for every image; use k_mass for ragged k), got {type(k).__name__}")
            if not 1 <= k <= n:
                raise ValueError(f"k must be in 1..{n} (patches in the high-res grid), got {k}")
        if k_mass is not None:
            # Validated once here with the model's own checks, on a dummy score row.
            model._resolve_k(torch.zeros(1, n), None, k_mass, k_min, k_max)
        self.k, self.k_mass, self.k_min, self.k_max = k, k_mass, k_min, k_max
        self.prefix = model.extractor.num_prefix_tokens
        self.max_batch = max_batch
        if k is not None:
            k_budget = k
        elif k_mass is not None and k_max is not None:
            k_budget = k_max
        else:
            k_budget = model.k
        self.max_tokens = max_tokens if max_tokens is not None else max_batch * (self.prefix + k_budget)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def capacity(self, stage: int) -> int:
        return self.max_batch if stage == 0 else self.max_tokens

    def weights(self, stage: int, state: tuple, n: int) -> list[int]:
        if stage == 0:
            return [1] * n
        return (state[3] + self.prefix).tolist()

    def run(self, stage: int, state: tuple, n: int) -> StepResult:
        model = self.model
        if stage == 0:
            images = state[0]
            model._check_images(images)
            scores, prefix = model.selector(images, model.grid)
            if self.k_mass is not None:
                k = model._resolve_k(scores, None, self.k_mass, self.k_min, self.k_max)
            else:
                k = torch.full((n,), self.k if self.k is not None else model.k, dtype=torch.int64)
            return StepResult([], None, 0, None, None, (images, scores, prefix, k))
        images, scores, prefix, k = state
        # Fixed k runs the dense path (as model(x, k=int) does); k_mass the packed ragged path (as alone).
        k_arg = k if self.k_mass is not None else int(k[0])
        run = model._reference if model.ops == "reference" else model._fused
        out = run(images, scores, prefix, k_arg, model.task)
        return StepResult(list(range(n)), out[f"{model.task}_logits"], 1, k.tolist(), [], None)


def _is_dyn_perceiver(model: Any) -> bool:
    return all(hasattr(model, f"forward_exit{i}") for i in (1, 2, 3, 4))


def _is_lookwhere(model: Any) -> bool:
    return hasattr(model, "selector") and hasattr(model, "extractor") and hasattr(model, "_resolve_k")


def build_pipeline(model, thresholds, k, k_mass, k_min, k_max, max_batch, max_tokens, criterion):
    """The pipeline for `model` and the image shape it expects ((3, H, W), or None when it cannot be told)."""
    if _is_lookwhere(model):
        if thresholds is not None:
            raise ValueError("thresholds apply to multi-exit models; LookWhere takes k or k_mass")
        size = model.config.high_res_size
        return LookWherePipeline(model, k, k_mass, k_min, k_max, max_batch, max_tokens), (3, size, size)
    if k is not None or k_mass is not None:
        raise ValueError("k and k_mass apply to LookWhere models; this model is not one")
    if max_tokens is not None:
        raise ValueError("max_tokens applies to LookWhere models; this model is not one")
    shape = None
    if isinstance(model, EarlyExitRunner):
        runner = model
        if criterion is not None and criterion != runner.criterion:
            raise ValueError(f"criterion {criterion!r} differs from the runner's {runner.criterion!r}")
    elif _is_dyn_perceiver(model):
        from ..models.dyn_perceiver.exit_stages import stages_and_heads

        runner = EarlyExitRunner(*stages_and_heads(model), criterion=criterion or "max_softmax")
        size = getattr(model, "input_size", None)
        shape = (3, size, size) if size else None
    elif callable(model):
        if thresholds is not None:
            raise ValueError("thresholds need a multi-exit model (an EarlyExitRunner or Dyn-Perceiver); "
                             "this model has one exit")
        runner = EarlyExitRunner([lambda s: s], [lambda s: model(s[0])], criterion=criterion or "max_softmax")
    else:
        raise TypeError(f"model must be a Dyn-Perceiver, a LookWhere, an EarlyExitRunner or a callable "
                        f"images -> logits, got {type(model).__name__}")
    return MultiExitPipeline(runner, thresholds, max_batch), shape
