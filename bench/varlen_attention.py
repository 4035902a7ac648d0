"""pytest-benchmark suite for varlen attention (BENCH.md rows A1-A4), over the same Case objects as
`python -m lookfast bench`: `PYTHONPATH=. pytest bench/varlen_attention.py --benchmark-only`."""
import pytest
import torch

from lookfast.benchmarks.cases.varlen_attention import cases

_CASES = {c.id: c for c in cases()}
_IMPLS = {
    "A1": ["lookfast", "sdpa", "einsum (official)"],
    "A2": ["lookfast", "sdpa", "einsum (official)"],
    "A3": ["lookfast", "sdpa padded + key mask", "sdpa per-sample loop", "sdpa nested (jagged)"],
    "A4": ["lookfast fwd+bwd", "sdpa padded + key mask fwd+bwd", "lookfast fwd only", "lookfast bwd op only"],
}
_BUILT: dict = {}


def _impl(case_id: str, name: str):
    if case_id not in _BUILT:
        _BUILT[case_id] = _CASES[case_id].setup()
    return _BUILT[case_id][name]


@pytest.mark.parametrize("case_id,impl", [(c, i) for c, impls in _IMPLS.items() for i in impls])
def test_varlen_attention(benchmark, case_id, impl):
    torch.set_num_threads(1)
    case = _CASES[case_id]
    benchmark.group = case_id
    benchmark.extra_info.update(shape=case.shape, flops=case.flops, bytes=case.bytes, bar=case.bars.get(impl))
    benchmark(_impl(case_id, impl))
