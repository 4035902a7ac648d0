"""`--model` specifications of the command line: "dyn_perceiver:<config>" or "lookwhere:<type>" -> a model in eval
mode, from an official checkpoint or (for trying things out) random weights."""
from __future__ import annotations

import os

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: the model was built with random weights (--random-weights), its predictions are meaningless. "
    "Give --checkpoint PATH to serve a trained model.")


def parse_model_spec(spec: str) -> tuple[str, str]:
    """"dyn_perceiver:reg800m_perceiver_t128" -> ("dyn_perceiver", "reg800m_perceiver_t128"); "lookwhere:dinov2"
    -> ("lookwhere", "dinov2"). ValueError naming the spec otherwise."""
    from ..models.dyn_perceiver import CONFIGS
    from ..models.lookwhere.model import TYPES

    family, _, name = str(spec).partition(":")
    if family == "dyn_perceiver":
        if name not in CONFIGS:
            raise ValueError(f"--model {spec!r}: unknown Dyn-Perceiver config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return family, name
    if family == "lookwhere":
        if name not in TYPES:
            raise ValueError(f"--model {spec!r}: LookWhere type must be one of {sorted(TYPES)}, got {name!r}")
        return family, name
    raise ValueError(f"--model must be 'dyn_perceiver:<config>' or 'lookwhere:<type>', got {spec!r}")


def load_model(spec: str, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
               ops: str = "fused", high_res_size: int = 518, k: int = 136, num_classes: int = 1000,
               task: str = "cls"):
    """Build the model of `spec` (see parse_model_spec) in eval mode.

    checkpoint: an official checkpoint file (Dyn-Perceiver: the authors' .pth; LookWhere: lookwhere_{dinov2,
    franca}.pt, its classifier head freshly initialised when the file has none). Exactly one of `checkpoint` and
    `random_weights=True` must be given. ops: "fused" (lookfast kernels) or "reference". high_res_size, k,
    num_classes, task: LookWhere only (Dyn-Perceiver checkpoints fix them)."""
    family, name = parse_model_spec(spec)
    if (checkpoint is None) == (not random_weights):
        raise ValueError("give either --checkpoint PATH or --random-weights (exactly one)")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ValueError(f"--checkpoint {os.fspath(checkpoint)!r} is not a file")
    if family == "dyn_perceiver":
        from ..models import dyn_perceiver as dp

        if checkpoint is not None:
            return dp.from_official_checkpoint(checkpoint, name, ops=ops).eval()
        return dp.build(name, ops=ops).eval()
    from ..models.lookwhere import LookWhere

    if checkpoint is not None:
        model = LookWhere.from_official_checkpoint(checkpoint, high_res_size, k, num_classes, task=task, ops=ops)
        if model.config.lw_type != name:
            raise ValueError(f"--model {spec!r} but the checkpoint holds a {model.config.lw_type} LookWhere")
        return model.eval()
    return LookWhere.from_config(lw_type=name, high_res_size=high_res_size, k=k, num_classes=num_classes, task=task,
                                 ops=ops).eval()
