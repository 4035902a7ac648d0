"""pytest-benchmark suite over the cases of lookfast.benchmarks.cases.dyn_perceiver (the same as `python -m lookfast bench`).

Run: pytest bench/dyn_perceiver.py --benchmark-json=out.json   (LOOKFAST_BENCH_QUICK=0 adds the full-size cases)
"""


def bench_dyn_perceiver(benchmark, case_impl):
    case_impl(benchmark)
