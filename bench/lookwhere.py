"""pytest-benchmark suite for M2 (LookWhere), over the same Case objects as `python -m lookfast bench`.

    PYTHONPATH=. pytest bench/lookwhere.py --benchmark-only            # quick cases
    LOOKFAST_BENCH_FULL=1 PYTHONPATH=. pytest bench/lookwhere.py --benchmark-only
"""
import functools
import os

import pytest
import torch

from lookfast.benchmarks.cases.lookwhere import cases

FULL = os.environ.get("LOOKFAST_BENCH_FULL") == "1"
CASES = {c.id: c for c in cases() if FULL or c.quick}


@functools.lru_cache(maxsize=1)
def _impls(case_id):
    return CASES[case_id].setup()


def _params():
    for case_id, case in CASES.items():
        # The implementation names are fixed by the case module; build only to list them when the case runs.
        names = ["lookfast fused", "reference ops (official)"]
        if case.summarize is not None:
            names.append("full-res ViT-B/14 (all patches)")
        for name in names:
            yield pytest.param(case_id, name, id=f"{case_id}-{name.split()[0]}")


@pytest.mark.parametrize("case_id,impl", list(_params()))
def test_m2(benchmark, case_id, impl):
    torch.set_num_threads(1)
    fn = _impls(case_id)[impl]
    benchmark.group = case_id
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
