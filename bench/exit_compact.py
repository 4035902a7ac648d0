"""pytest-benchmark suite over the cases of lookfast.benchmarks.cases.exit_compact (the same as `python -m lookfast bench`).

Run: pytest bench/exit_compact.py --benchmark-json=out.json   (LOOKFAST_BENCH_QUICK=0 adds the full-size cases)
"""


def bench_exit_compact(benchmark, case_impl):
    case_impl(benchmark)
