"""Parametrises each `bench/<op>.py` over the cases of `lookfast.benchmarks.cases.<op>` and their implementations, so
the pytest-benchmark suites and `python -m lookfast bench` time the same callables (no copied setup code).

A suite file needs only:  def bench_<op>(benchmark, case_impl): case_impl(benchmark)
"""
import importlib
import os

import pytest
import torch


def _cases_for(path: str):
    op = os.path.splitext(os.path.basename(path))[0]
    module = importlib.import_module(f"lookfast.benchmarks.cases.{op}")
    quick = os.environ.get("LOOKFAST_BENCH_QUICK", "1") == "1"
    return [c for c in module.cases() if c.quick or not quick]


def pytest_generate_tests(metafunc):
    if "case_impl" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for case in _cases_for(str(metafunc.definition.path)):
        names = list(case.setup())  # implementation names are known only after setup; inputs are freed at once
        for impl in names:
            params.append((case, impl))
            ids.append(f"{case.id}-{impl}")
    metafunc.parametrize("case_impl_param", params, ids=ids, indirect=False)


@pytest.fixture
def case_impl(case_impl_param):
    """A callable taking the `benchmark` fixture: times one implementation of one case."""
    case, impl = case_impl_param
    torch.set_num_threads(1)
    impls = case.setup()

    def run(benchmark):
        benchmark.extra_info.update({"case": case.id, "op": case.op, "shape": case.shape, "impl": impl})
        benchmark(impls[impl])

    return run
