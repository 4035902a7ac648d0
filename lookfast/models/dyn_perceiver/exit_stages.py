"""Real early exiting for Dyn-Perceiver: the model as ordered stages + exit heads for `lookfast.EarlyExitRunner`
(docs/ops.md section 3), so later stages (CNN blocks included) run on the surviving samples only.

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


def forward_early_exit(model, images: torch.Tensor, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W), thresholds 4 max-softmax thresholds (the last ignored) ->
    (logits (B, num_classes), exit_index (B,) int64 in 0..3)."""
    import lookfast

    stages, heads = stages_and_heads(model)
    with torch.no_grad():
        return lookfast.EarlyExitRunner(stages, heads)((images,), thresholds)
