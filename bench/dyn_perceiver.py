"""pytest-benchmark suite for the Dyn-Perceiver model (BENCH.md M1), over the same Case objects as
`python -m lookfast bench` (lookfast/benchmarks/cases/dyn_perceiver.py: M1-full, M1-ee25, M1-eeB).

    PYTHONPATH=. pytest bench/dyn_perceiver.py --benchmark-only --benchmark-group-by=group
    LOOKFAST_BENCH_QUICK=0 ... for the B 64 rows as well
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from lookfast.benchmarks.cases.dyn_perceiver import cases

QUICK = os.environ.get("LOOKFAST_BENCH_QUICK", "1") == "1"
CASES = {case.id + ("" if case.quick else "-B64"): case for case in cases() if case.quick or not QUICK}
MAX_IMPLS = 3


@functools.lru_cache(maxsize=1)
def _implementations(case_id: str) -> dict:
    return CASES[case_id].setup()  # one case's models alive at a time


@pytest.mark.parametrize("slot", range(MAX_IMPLS))
@pytest.mark.parametrize("case_id", list(CASES))
def test_dyn_perceiver_bench(benchmark, case_id, slot):
    torch.set_num_threads(1)
    impls = _implementations(case_id)
    if slot >= len(impls):
        pytest.skip(f"{case_id} has {len(impls)} implementations")
    name, fn = list(impls.items())[slot]
    case = CASES[case_id]
    benchmark.group = case_id
    benchmark.name = f"{case_id}[{name}]"
    benchmark.extra_info.update({"op": case.op, "shape": case.shape, "impl": name, "bar": case.bars.get(name)})
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
