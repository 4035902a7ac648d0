"""Real early exiting for Dyn-Perceiver: the model as ordered stages + exit heads for `lookfast.EarlyExitRunner`
(OPS.md section 3), so later stages (CNN blocks included) run on the surviving samples only.

    stage 1: images            -> (x, z, y1)      stem, CNN stages 1-2, latent stages 1-3     head 1: y1
    stage 2: (x, z, y1)        -> (x, z, y2)      CNN stage 3, latent stage 4 (isc uses y1)   head 2: y2
    stage 3: (x, z, y2)        -> (x, z, y2, y3)  CNN stage 4, CNN head                       head 3: y3
    stage 4: (x, z, y2)        -> (y4,)           final z->x, merged head (isc uses y2)       head 4: y4

Each head returns (logits, state) with the logits it reads dropped from the state when no later stage needs them.
"""
from __future__ import annotations

import torch


def stages_and_heads(model):
    """The (stages, heads) description of `model` for an EarlyExitRunner."""

    def stage1(state):
        return model.forward_exit1(state[0])

    def stage2(state):
        return model.forward_exit2(*state)

    def stage3(state):
        x, z, y2 = state
        x, y3 = model.forward_exit3(x)
        return x, z, y2, y3

    def stage4(state):
        return (model.forward_exit4(*state),)

    heads = [
        lambda s: s[2],                 # y1 stays in the state: stage 2's isc input
        lambda s: s[2],                 # y2 stays: stage 4's isc input
        lambda s: (s[3], s[:3]),        # y3 is not needed later
        lambda s: s[0],
    ]
    return [stage1, stage2, stage3, stage4], heads


def _runner_class():
    import lookfast

    runner = getattr(lookfast, "EarlyExitRunner", None)
    return runner if runner is not None else _PlainRunner


class _PlainRunner:
    """Stand-in with EarlyExitRunner's contract (max-softmax criterion) for builds of lookfast that predate it."""

    def __init__(self, stages, heads, criterion: str = "max_softmax"):
        if criterion != "max_softmax":
            raise ValueError("this fallback runner supports criterion='max_softmax' only")
        self.stages, self.heads = stages, heads

    def __call__(self, inputs, thresholds):
        state = inputs if isinstance(inputs, tuple) else (inputs,)
        batch, last = state[0].shape[0], len(self.stages) - 1
        rows = torch.arange(batch, device=state[0].device)
        exit_index = torch.full((batch,), last, dtype=torch.int64, device=rows.device)
        out = None
        for i, (stage, head) in enumerate(zip(self.stages, self.heads)):
            state = stage(state)
            res = head(state)
            logits, state = res if isinstance(res, tuple) else (res, state)
            if out is None:
                out = logits.new_full((batch, logits.shape[1]), float("nan"))
            if i == last:
                out[rows] = logits
                break
            leave = logits.softmax(-1).amax(-1) >= float(thresholds[i])  # NaN compares False: never leaves
            out[rows[leave]] = logits[leave]
            exit_index[rows[leave]] = i
            keep = (~leave).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows = rows[keep]
            state = tuple(t.index_select(0, keep) if isinstance(t, torch.Tensor) else t for t in state)
        return out, exit_index


def forward_early_exit(model, images: torch.Tensor, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W), thresholds 4 max-softmax thresholds (the last ignored) ->
    (logits (B, num_classes), exit_index (B,) int64 in 0..3)."""
    stages, heads = stages_and_heads(model)
    with torch.no_grad():
        return _runner_class()(stages, heads)((images,), thresholds)
