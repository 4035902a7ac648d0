"""Parametrises each `bench/<op>.py` over the cases of `lookfast.benchmarks.cases.<op>` and their implementations, so
the pytest-benchmark suites and `python -m lookfast bench` time the same callables (no copied setup code).

A suite file needs only:  def bench_<op>(benchmark, case_impl): case_impl(benchmark)
`LOOKFAST_BENCH_QUICK=0` adds the cases `--quick` leaves out. `LOOKFAST_BENCH_DTYPE=float32|bfloat16|all` picks the
precision variants as `--dtype` does (default: bf16 where the CPU has AMX or AVX512-BF16, else float32).
"""
import importlib
import os

import pytest
import torch


def _cases_for(path: str):
    op = os.path.splitext(os.path.basename(path))[0]
    module = importlib.import_module(f"lookfast.benchmarks.cases.{op}")
    quick = os.environ.get("LOOKFAST_BENCH_QUICK", "1") == "1"
    from lookfast.benchmarks import ceilings
    from lookfast.benchmarks.case import DTYPE_NAMES

    choice = os.environ.get("LOOKFAST_BENCH_DTYPE", "")
    dtypes = (list(DTYPE_NAMES.values()) if choice == "all" else [DTYPE_NAMES[choice]] if choice
              else ceilings.default_dtypes())
    return [c for c in module.cases() if (c.quick or not quick) and (c.dtype is None or c.dtype in dtypes)]


_current: dict = {}


def _implementations(case):
    # One case's inputs alive at a time (some hold hundreds of MB); collection and the runs share the setup.
    if _current.get("case") is not case:
        _current.clear()
        _current.update(case=case, impls=case.setup())
    return _current["impls"]


def pytest_generate_tests(metafunc):
    if "case_impl" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for case in _cases_for(str(metafunc.definition.path)):
        for impl in _implementations(case):  # implementation names are known only after setup
            params.append((case, impl))
            ids.append(f"{case.id}-{impl}")
    metafunc.parametrize("case_impl_param", params, ids=ids)


@pytest.fixture
def case_impl(case_impl_param):
    """A callable taking the `benchmark` fixture: times one implementation of one case (1 intra-op thread)."""
    case, impl = case_impl_param
    torch.set_num_threads(1)

    def run(benchmark):
        benchmark.group = case.id
        benchmark.extra_info.update({"case": case.id, "op": case.op, "shape": case.shape, "impl": impl,
                                     "bytes": case.bytes, "flops": case.flops, "bar": case.bars.get(impl)})
        benchmark(_implementations(case)[impl])

    return run
