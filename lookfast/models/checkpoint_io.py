"""Checks shared by the reference models at their boundaries: checkpoint files that cannot be read (truncated,
corrupt, not a checkpoint) and images holding NaN or inf. Each raises a ValueError naming the file or argument, before
anything is built or computed, so a failure never leaves a half-loaded model or half-written outputs behind."""
from __future__ import annotations

import os

import torch


def load_checkpoint_file(path: str | os.PathLike, trusted: bool = False, extra_safe_globals=()):
    """torch.load on the CPU (the safe unpickler unless trusted=True), with a clear ValueError for a file that is
    missing pieces (truncated download, disk full during save) or is not a torch checkpoint at all."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {os.fspath(path)!r} does not exist")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails anywhere in the unpickler (EOFError, IndexError, BadZipFile...)
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text:
            raise
        size = os.path.getsize(path)
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(f"checkpoint file {os.fspath(path)!r} ({size} bytes) cannot be read: it is truncated, "
                         f"corrupt or not a torch checkpoint (torch.load said: {first[:200]})") from exc


def check_finite_images(images: torch.Tensor, name: str = "images") -> None:
    """ValueError if `images` holds NaN or inf (checked on the CPU, and on GPUs outside torch.compile: one sync)."""
    if torch.compiler.is_compiling() or images.numel() == 0 or images.device.type == "meta":
        return  # traced, empty, or shapes only (MAC counting runs the model on meta tensors): no values to check
    # One reduction pass: min and max propagate NaN, and are finite only when every value is (isfinite().all() is
    # two passes plus a bool map, ~30x slower on a bf16 batch).
    lo, hi = torch.aminmax(images)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        bad = int((~torch.isfinite(images)).sum())
        raise ValueError(f"{name} holds {bad} NaN or inf value(s); a model cannot give a meaningful output for them "
                         "(check the decoding / normalisation of the input)")
