"""pytest-benchmark suite over the cases of lookfast.benchmarks.cases.serving (the same as `python -m lookfast bench`).

Run: pytest bench/serving.py --benchmark-json=out.json   (LOOKFAST_BENCH_QUICK=0 adds the full-size cases)
"""


def bench_serving(benchmark, case_impl):
    case_impl(benchmark)
