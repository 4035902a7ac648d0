"""Loading the authors' checkpoint files: `{"model": sd}`, `{"model_ema": sd}` or a bare state dict, with or without
the "module." prefix DistributedDataParallel adds; strict, with errors that name the offending keys."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import torch
from torch import nn

WRAPPER_KEYS = ("model_ema", "model", "state_dict")  # EMA first: the README evaluates with --model_ema_eval


def unwrap(checkpoint: Mapping, prefer: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint object. `prefer` picks "model" or "model_ema" when both exist."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
    order = ((prefer,) if prefer else ()) + WRAPPER_KEYS
    sd = checkpoint
    for key in order:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            sd = checkpoint[key]
            break
    else:
        if prefer:
            raise KeyError(f"checkpoint has no {prefer!r} entry (keys: {sorted(checkpoint)[:8]})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """`load_state_dict(strict=True)` with one error listing missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad_shape = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        lines = ["checkpoint does not fit the model:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", bad_shape)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {label}: {shown}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def read(path: str | os.PathLike, trusted: bool = False) -> Mapping:
    """torch.load on CPU with the safe unpickler (tensors, containers and the argparse.Namespace of training args the
    official trainer saves). A file needing anything else is refused unless `trusted=True`, which uses the full
    unpickler: that runs code from the file, so only do it for files you trust."""
    from ..checkpoint_io import load_checkpoint_file

    if trusted:
        return load_checkpoint_file(path, trusted=True)
    try:
        return load_checkpoint_file(path, extra_safe_globals=[argparse.Namespace])
    except Exception as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise
        raise ValueError(
            f"{path}: the checkpoint holds Python objects beyond tensors; if you trust the file, pass trusted=True "
            f"(full unpickling runs code from the file). Loader said: {str(exc).splitlines()[0]}"
        ) from exc
