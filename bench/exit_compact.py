"""pytest-benchmark suite for exit-masked execution, over the same Case objects as `python -m lookfast bench`
(lookfast/benchmarks/cases/exit_compact.py: E1, E1-compile, EX-0/50/90).

    PYTHONPATH=. pytest bench/exit_compact.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import functools

import pytest
import torch

from lookfast.benchmarks.cases.exit_compact import cases

CASES = {case.id: case for case in cases()}
MAX_IMPLS = 3


@functools.lru_cache(maxsize=1)
def _implementations(case_id: str) -> dict:
    return CASES[case_id].setup()  # one case's inputs alive at a time (E1 holds ~240 MB)


@pytest.mark.parametrize("slot", range(MAX_IMPLS))
@pytest.mark.parametrize("case_id", list(CASES))
def test_exit_compact_bench(benchmark, case_id, slot):
    torch.set_num_threads(1)
    impls = _implementations(case_id)
    if slot >= len(impls):
        pytest.skip(f"{case_id} has {len(impls)} implementations")
    name, fn = list(impls.items())[slot]
    case = CASES[case_id]
    benchmark.group = case_id
    benchmark.name = f"{case_id}[{name}]"
    benchmark.extra_info.update({"op": case.op, "shape": case.shape, "impl": name, "bytes": case.bytes,
                                 "flops": case.flops, "bar": case.bars.get(name)})
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
