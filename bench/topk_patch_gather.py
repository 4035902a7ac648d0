"""pytest-benchmark suite for docs/benchmarks.md rows G1-G3 (cases from lookfast.benchmarks.cases.topk_patch_gather).

Run: pytest bench/topk_patch_gather.py --benchmark-json=out.json   (LOOKFAST_BENCH_QUICK=0 adds G1)
"""


def bench_topk_patch_gather(benchmark, case_impl):
    case_impl(benchmark)
