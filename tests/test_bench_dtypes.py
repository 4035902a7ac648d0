"""The benchmark suite's precision variants (`dtype_variants` tags and names them, `--dtype` selects among them,
cases without variants run under every selection) and the thread counts each case runs at."""
import torch

from lookfast.benchmarks import ceilings
from lookfast.benchmarks.case import Case, dtype_variants
from lookfast.benchmarks.run import load_cases


def _make(dtype):
    return Case(id="Z9", op="z", shape="s", setup=lambda: {}, bars={"peer": 2.0 if dtype == torch.float32 else 1.5})


def test_dtype_variants_tag_and_suffix():
    made = dtype_variants(_make)
    assert [(c.id, c.dtype) for c in made] == [("Z9", torch.float32), ("Z9-bf16", torch.bfloat16)]
    assert made[0].bars == {"peer": 2.0} and made[1].bars == {"peer": 1.5}
    assert [c.id for c in dtype_variants(lambda d: [_make(d), _make(d)], (torch.float16,))] == ["Z9-fp16", "Z9-fp16"]


def test_load_cases_filters_by_dtype():
    fp32 = load_cases(False, None, [torch.float32])
    bf16 = load_cases(False, None, [torch.bfloat16])
    both = load_cases(False, None, [torch.float32, torch.bfloat16])
    assert all(c.dtype in (None, torch.float32) for c in fp32)
    assert all(c.dtype in (None, torch.bfloat16) for c in bf16)
    assert any(c.dtype == torch.bfloat16 for c in bf16), "no case declares a bf16 variant"
    untyped = {c.id for c in both if c.dtype is None}
    assert untyped <= {c.id for c in fp32} and untyped <= {c.id for c in bf16}
    assert len(both) == len(fp32) + len(bf16) - sum(c.dtype is None for c in both)
    # --only G1 picks every precision of G1, --dtype narrows it
    assert {c.id for c in load_cases(False, ["G1"], None)} == {"G1", "G1-bf16"}
    assert {c.id for c in load_cases(False, ["G1"], [torch.bfloat16])} == {"G1-bf16"}


def test_default_dtype_follows_matrix_features():
    features = ceilings.matrix_features()
    assert set(features) <= {"AMX-BF16", "AMX-FP16", "AVX512-BF16", "AVX512-FP16"}
    expected = torch.bfloat16 if {"AMX-BF16", "AVX512-BF16"} & set(features) else torch.float32
    assert ceilings.default_dtypes() == [expected]


def test_thread_counts_asked_for_apply_to_every_case():
    from lookfast.benchmarks.run import thread_jobs

    one = Case(id="M9", op="m", shape="s", setup=lambda: {}, multi_thread=False)
    many = Case(id="A9", op="a", shape="s", setup=lambda: {})
    pairs = lambda jobs: [(c.id, t) for c, t in jobs]  # noqa: E731
    # default full run: 1 and 2 threads, single-thread-only cases at 1; quick: 1 thread
    assert pairs(thread_jobs([one, many], None, quick=False)) == [("M9", 1), ("A9", 1), ("A9", 2)]
    assert pairs(thread_jobs([one, many], None, quick=True)) == [("M9", 1), ("A9", 1)]
    # `--threads 2` (or any list) runs every case at each count asked for, not zero cases
    assert pairs(thread_jobs([one, many], [2], quick=False)) == [("M9", 2), ("A9", 2)]
    assert pairs(thread_jobs([one], [1, 2], quick=True)) == [("M9", 1), ("M9", 2)]
