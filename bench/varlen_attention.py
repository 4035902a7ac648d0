"""pytest-benchmark suite over the cases of lookfast.benchmarks.cases.varlen_attention (the same as `python -m lookfast bench`).

Run: pytest bench/varlen_attention.py --benchmark-json=out.json   (LOOKFAST_BENCH_QUICK=0 adds the full-size cases)
"""


def bench_varlen_attention(benchmark, case_impl):
    case_impl(benchmark)
