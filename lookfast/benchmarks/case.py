"""What a benchmark case is: one shape of one op, the implementations timed side by side on it, and its cost."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Case:
    """One row group of the report.

    id:      the docs/benchmarks.md row id ("G1", "A3", ...), plus a suffix for variants ("A4-bwd").
    op:      the op or model measured.
    shape:   human-readable shape.
    setup:   builds the inputs (lazily, only when the case runs) and returns {implementation name: zero-arg callable}.
             The first entry is lookfast's implementation; the rest are peers. Each callable must block until done.
    bytes:   bytes the lookfast implementation must move at least (for GB/s; 0 when not meaningful).
    flops:   floating-point operations of the computation (for GFLOP/s; 0 when not meaningful).
    bars:    {peer name: minimum speedup of lookfast over it} from docs/benchmarks.md, reported as met / not met.
    quick:   part of `--quick`.
    multi_thread: also measured with 2 intra-op threads in the default full run (an explicit `--threads` list runs
                  every selected case at each count given).
    summarize: optional callable({impl: seconds}) -> list of note strings (e.g. time ratio vs MACs ratio for M1).
    dtype:   the precision this case measures (torch.float32, torch.bfloat16, ...), or None for a case with no
             precision variants (it runs whatever `--dtype` selects). Declare variants with `dtype_variants`.
    turns:   1: each implementation is timed in one stretch, one after the other. N > 1: the implementations take N
             turns each, round-robin, for 1/N of the time budget per turn, and each median pools all turns' samples;
             for model-sized cases, where the load of a shared machine drifts over the seconds a case takes and
             would otherwise favour whichever implementation ran in the quieter stretch.
    """

    id: str
    op: str
    shape: str
    setup: Callable[[], dict[str, Callable[[], Any]]]
    bytes: int = 0
    flops: int = 0
    bars: dict[str, float] = field(default_factory=dict)
    quick: bool = True
    multi_thread: bool = True
    summarize: Callable[[dict[str, float]], list[str]] | None = None
    turns: int = 1
    dtype: torch.dtype | None = None


DTYPE_SUFFIX = {torch.float32: "", torch.bfloat16: "-bf16", torch.float16: "-fp16"}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_variants(make: Callable[[torch.dtype], Case | list[Case]],
                   dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> list[Case]:
    """One case (or list of cases) per dtype from `make(dtype)`, each tagged with its dtype and, for the low
    precisions, its id suffixed ("G1" -> "G1-bf16", "A3-bwd" -> "A3-bwd-bf16"): the float32 ids stay as they were,
    so `--only G1` selects every precision of G1 and `--dtype` picks among them.

    `make` builds the inputs, weights and peers in the dtype it is given (bars may differ per dtype)."""
    out: list[Case] = []
    for dtype in dtypes:
        made = make(dtype)
        for case in made if isinstance(made, list) else [made]:
            case.id += DTYPE_SUFFIX[dtype]
            case.dtype = dtype
            out.append(case)
    return out
