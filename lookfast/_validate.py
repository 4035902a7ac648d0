"""Input checks shared by the ops: each raises TypeError/ValueError naming the argument and what was expected."""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_dim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def require_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def require_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and not isinstance(t, torch.Tensor):  # a numpy array has .device == "cpu" too
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}; move them to one device")


def require_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def require_float_list(name: str, value, what: str) -> list[float]:
    """`value` (a 1-D tensor or a sequence of numbers) as a list of floats; `what` says what the entries are for the
    messages (e.g. "one per exit"). Raises ValueError for a tensor of another rank, TypeError for non-numbers."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D ({what}), got shape {tuple(value.shape)}")
        value = value.tolist()
    try:
        return [float(x) for x in value]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers ({what})") from None


def require_shape(name: str, t: torch.Tensor, shape: tuple, layout: str) -> None:
    """Raise ValueError unless t.shape == shape (layout names the axes for the message, e.g. "(D, C, p, p)")."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


INT32_MAX = 2**31 - 1


def require_int_range(name: str, value, lo: int, hi: int, why: str = "") -> int:
    """`value` as an int in [lo, hi]; TypeError for a non-int, ValueError (short, naming `name`) outside the range."""
    require_int(name, value)
    if not lo <= value <= hi:
        bound = "2**31 - 1" if hi == INT32_MAX else str(hi)
        raise ValueError(f"{name} must be in [{lo}, {bound}]{why}, got {value}")
    return value


def short_repr(values: list, limit: int = 8) -> str:
    """The first `limit` entries of a list, for error messages that must stay short whatever the input size."""
    if len(values) <= limit:
        return str(values)
    return "[" + ", ".join(map(str, values[:limit])) + f", ... ({len(values)} values)]"
