"""Dyn-Perceiver (Han et al., ICCV 2023) for inference, loadable from the authors' checkpoints.

    m = build("reg800m_perceiver_t128", ops="fused")        # README constructor defaults
    m = from_official_checkpoint(path, "reg800m_perceiver_t128")
    y1, y2, y3, y4 = m(x)                                    # the four exits (eval mode)
    logits, exit_index = m.forward_early_exit(x, thresholds)
    m.exit_macs()                                            # cumulative multiply-accumulates per exit
"""
from __future__ import annotations

import os

from .checkpoint import load_strict, read, unwrap
from .configs import CONFIGS, DEPTH_FACTOR, RELEASED
from .model import DynPerceiver, family_of

__all__ = ["build", "from_official_checkpoint", "DynPerceiver", "CONFIGS", "RELEASED"]


def build(name: str, ops: str = "reference", **kwargs) -> DynPerceiver:
    """Build the official configuration `name` (e.g. "reg800m_perceiver_t128") with the README constructor defaults
    (spatial_reduction, with_* all True, SA_widening_factor 4, the family's depth_factor); `kwargs` override them
    as the official constructor's arguments would. The model is returned in eval mode, randomly initialised."""
    if name not in CONFIGS:
        raise ValueError(f"unknown Dyn-Perceiver config {name!r}; known: {', '.join(sorted(CONFIGS))}")
    cnn_arch, num_latents = CONFIGS[name]
    kwargs.setdefault("depth_factor", DEPTH_FACTOR[family_of(cnn_arch)])
    model = DynPerceiver(cnn_arch, num_latents, ops=ops, **kwargs)
    model.name = name
    return model.eval()


def from_official_checkpoint(path: str | os.PathLike, name: str, ops: str = "reference", prefer: str | None = None,
                             trusted: bool = False, **kwargs) -> DynPerceiver:
    """Build `name` and load an official checkpoint file strictly. The file may hold `{"model": sd}`,
    `{"model_ema": sd}` (the EMA weights are taken when both exist, unless `prefer="model"`) or a bare state dict;
    "module." prefixes are stripped. Raises ValueError naming missing / unexpected / mis-shaped keys. Files are read
    with torch's safe unpickler; `trusted=True` allows the full one (see `checkpoint.read`)."""
    model = build(name, ops=ops, **kwargs)
    load_strict(model, unwrap(read(path, trusted), prefer))
    return model.eval()
