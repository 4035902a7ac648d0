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

from ..early_exit.runner import EarlyExitRunner, _state_rows, never_passes
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


class MultiExitPipeline:
    """Stages and heads as `EarlyExitRunner` describes them (see lookfast/early_exit/runner.py)."""

    kind = "multi_exit"

    def __init__(self, runner: EarlyExitRunner, thresholds, max_batch: int):
        self.runner = runner
        self.num_stages = runner.num_exits
        self.thresholds = None if thresholds is None else runner._thresholds(thresholds)
        self.max_batch = max_batch

    def capacity(self, stage: int) -> int:
        """Units one batch of `stage` may hold: max_batch images."""
        return self.max_batch

    def weights(self, stage: int, state: tuple, n: int) -> list[int]:
        """Units of each of the n rows of `state` at `stage`: 1 per image."""
        return [1] * n

    def run(self, stage: int, state: tuple, n: int) -> StepResult:
        """stages[stage] then heads[stage] on `state` (n rows): the rows whose confidence passes the stage's
        threshold finish (all of them at the last stage), the others go on with their compacted state."""
        runner, last = self.runner, self.num_stages - 1
        logits, state = runner._run_exit(stage, state, n)
        if stage == last:
            return StepResult(list(range(n)), logits, stage, None, [], None)
        slots = _state_rows(state, n, stage)
        if self.thresholds is None or never_passes(runner.criterion, self.thresholds[stage]):
            return StepResult([], None, stage, None, None, state)  # nobody can leave: no confidences, no copy
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

    The computation is the model's own: stage 0 is `LookWhere.select`, stage 1 `LookWhere.extract`, the two halves
    of its forward, so each image's result equals `model(image[None], k=..., k_mass=..., ...)` run alone."""

    kind = "lookwhere"
    num_stages = 2

    def __init__(self, model, k, k_mass, k_min: int, k_max: int | None, max_batch: int, max_tokens: int | None):
        self.model = model
        # One k for every image: a tensor k (one per image) has no meaning for a stream of requests.
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
            raise TypeError(f"k must be an int (one k for every image; use k_mass for ragged k), got {type(k).__name__}")
        # Validated once here by the model's own rule (what select will do per batch), on a dummy score row.
        model.resolve_k(torch.zeros(1, model.grid * model.grid), k, k_mass, k_min, k_max)
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
        """Units one batch may hold: max_batch images (selector), max_tokens tokens (extractor)."""
        return self.max_batch if stage == 0 else self.max_tokens

    def weights(self, stage: int, state: tuple, n: int) -> list[int]:
        """Units of each row: 1 per image at the selector, its prefix + k tokens at the extractor."""
        if stage == 0:
            return [1] * n
        return (state[3] + self.prefix).tolist()

    def run(self, stage: int, state: tuple, n: int) -> StepResult:
        """Stage 0: state (images,) -> every row goes on with (images, scores, prefix, k (n,) int64). Stage 1: that
        state (rows regrouped from any stage-0 batches) -> every row finishes with its logits and k."""
        model = self.model
        if stage == 0:
            images = state[0]
            (scores, prefix), k = model.select(images, self.k, k_mass=self.k_mass, k_min=self.k_min, k_max=self.k_max)
            if not isinstance(k, torch.Tensor):  # one k for all: a row each, so batches can be regrouped
                k = torch.full((n,), k, dtype=torch.int64)
            return StepResult([], None, 0, None, None, (images, scores, prefix, k))
        images, scores, prefix, k = state
        # Fixed k runs the dense path (as model(x, k=int) does); k_mass the packed ragged path (as alone).
        k_arg = k if self.k_mass is not None else int(k[0])
        out = model.extract(images, scores, prefix, k_arg)
        return StepResult(list(range(n)), out[f"{model.task}_logits"], 1, k.tolist(), [], None)


def _is_dyn_perceiver(model: Any) -> bool:
    return all(hasattr(model, f"forward_exit{i}") for i in (1, 2, 3, 4))


def _is_lookwhere(model: Any) -> bool:
    return all(hasattr(model, name) for name in ("selector", "extractor", "select", "extract"))


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
