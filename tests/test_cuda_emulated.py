"""lookfast's CUDA kernels (csrc/cuda) with their host code, run on the CPU by the CUDA emulator of
tests/cuda_emulator (every CUDA thread a coroutine; barriers, shuffles, wmma tensor-core fragments and launch limits
emulated and checked), held to what the GPU tests (test_gpu.py) hold them to: float64 math, FlashAttention's rule for
bf16/fp16 and fp32 (forward error at most 2x, gradients 3x those of plain PyTorch in the same dtype), every output
element written. The emulated GPU is an sm_90 (H100/H200: 227 KB of shared memory per block) or an sm_80 (A100: 163
KB), or an sm_75 (no bf16 tensor cores: the SIMT kernels). Threads run forward, in reverse or shuffled between
barriers, and every order must give bitwise the same results (a result that depends on it reads another thread's
shared-memory writes without a barrier: a race on a GPU).

What this cannot check: speed, nvcc's code generation (test_check_cuda_build.py, where nvcc exists), the tensor
cores' own summation order (the emulator sums each 16x16x16 product in order, in fp32), and races that no thread
order exposes. The same kernels also run every op test of the suite when LOOKFAST_TEST_CUDA_EMULATOR is set
(tests/conftest.py; .ci/run does it)."""
import math
import os
import random
import sys

import pytest
import torch

import lookfast  # noqa: F401  (loads the CPU library: the oracles' comparisons use it)
from cuda_cases import ATTN
from oracles import rel_err, varlen_attention as reference, within_flash_rule
from test_varlen_attention_triton import make_case, reference_lowp
from varlen_inputs import check_outputs_fully_written

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emulator"))
import build as emulator_build  # noqa: E402

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emu():
    """torch.ops.lookfast_cuda_emu: lookfast's op schemas with the emulated CUDA kernels (built once, ~1 minute)."""
    ops = emulator_build.load()
    yield ops
    configure()


def configure(sm=90, order=0, seed=0):
    torch.ops.lookfast_cuda_emu_control.configure(sm, order, seed)


def last_kernel(backward):
    return torch.ops.lookfast_cuda_emu_diag.varlen_attention_last_kernel(backward)


def attention_both_ways(emu, case, dtype, seed):
    """Forward and backward of ATTN[case] on the emulated kernels: (out, lse, (dq, dk, dv)), with the inputs."""
    lens_q, lens_k, heads, kv_heads, dk, dv, causal = ATTN[case]
    q, k, v, cu_q, cu_k = make_case(lens_q, lens_k, heads, kv_heads, dk, dv, dtype, seed)
    scale = 1.0 / math.sqrt(dk)
    out, lse = emu.varlen_attention_fwd(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), scale, causal)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = emu.varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k), scale, causal)
    return (q, k, v, cu_q, cu_k, scale, causal, dout), (out, lse, grads)


def assert_attention_rule(inputs, results, dtype):
    """out, lse and gradients against float64 math: FlashAttention's rule (2x / 3x plain torch in `dtype`) for fp32
    and 16-bit inputs, 1e-12 / 1e-11 relative for float64."""
    (q, k, v, cu_q, cu_k, scale, causal, dout), (out, lse, grads) = inputs, results
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    truth, truth_lse = reference(q64, k64, v64, cu_q, cu_k, scale, causal)
    truth_grads = torch.autograd.grad(truth, (q64, k64, v64), dout.double())
    assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    if dtype == torch.float64:
        assert rel_err(out, truth) < 1e-12
        for name, g, t in zip("qkv", grads, truth_grads):
            assert rel_err(g, t) < 1e-11, name
        return
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    same = reference_lowp(ql, kl, vl, cu_q, cu_k, scale, causal)  # plain torch in `dtype`
    same_grads = torch.autograd.grad(same, (ql, kl, vl), dout)
    within_flash_rule(out, same, truth, 2, "out")
    assert rel_err(lse, truth_lse) < 1e-5  # lse from the rounded inputs, fp32 statistics
    for name, g, t_same, t in zip("qkv", grads, same_grads, truth_grads):
        within_flash_rule(g, t_same, t, 3, f"d{name}")


# the kernel family each setting must run: tensor cores for bf16/fp16 with head dims <= 128 on sm_80+ (the tiles fit
# in both GPUs' shared memory), the SIMT kernels otherwise
PATHS = {"sm90": (90, "1"), "sm80": (80, "1"), "sm75": (75, "1"), "simt": (90, "0")}


# float32 runs the SIMT kernels whatever the GPU: one path for it; bf16/fp16 on every path
PATH_DTYPES = [pytest.param(p, d, id=f"{i}-{p}") for p in PATHS
               for d, i in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))
               if d != torch.float32 or p == "sm90"]


@pytest.mark.parametrize("path, dtype", PATH_DTYPES)
@pytest.mark.parametrize("case", range(len(ATTN)))
def test_varlen_attention(emu, case, dtype, path, seed, monkeypatch):
    sm, mma = PATHS[path]
    configure(sm)
    monkeypatch.setenv("LOOKFAST_CUDA_MMA", mma)
    inputs, results = attention_both_ways(emu, case, dtype, seed)
    dk, dv = ATTN[case][4:6]
    want = "mma" if dtype != torch.float32 and mma == "1" and sm >= 80 and max(dk, dv) <= 128 else "simt"
    assert (last_kernel(False), last_kernel(True)) == (want, want)
    assert_attention_rule(inputs, results, dtype)


# Heads wider than 256 (the SIMT kernels, up to 512): Dyn-Perceiver's x->z cross-attention is one head of 320
# (reg800m) or 384 (resnet50) channels; until 4 Dec the CUDA kernels refused them, so the fused released models could
# not run on a GPU (found by the model tests on the emulator)
WIDE = [([7, 0, 30, 1], [50, 3, 0, 9], 1, 1, 320, 320, False), ([33, 5], [40, 2], 2, 1, 384, 384, True),
        ([9], [13], 1, 1, 512, 500, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("case", WIDE, ids=["320", "384-causal", "512"])
def test_varlen_attention_wide_heads(emu, case, dtype, seed):
    configure(90)
    lens_q, lens_k, heads, kv_heads, dk, dv, causal = case
    q, k, v, cu_q, cu_k = make_case(lens_q, lens_k, heads, kv_heads, dk, dv, dtype, seed)
    scale = 1.0 / math.sqrt(dk)
    out, lse = emu.varlen_attention_fwd(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), scale, causal)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grads = emu.varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k), scale, causal)
    assert last_kernel(False) == last_kernel(True) == "simt"
    assert_attention_rule((q, k, v, cu_q, cu_k, scale, causal, dout), (out, lse, grads), dtype)


@pytest.mark.parametrize("case", [0, 3, 5])
def test_varlen_attention_float64_is_float64_throughout(emu, case, seed):
    configure(90)
    inputs, results = attention_both_ways(emu, case, torch.float64, seed)
    assert last_kernel(False) == last_kernel(True) == "simt"
    assert_attention_rule(inputs, results, torch.float64)


# every family of kernel: tensor cores (bf16, head dims padded to 128 and to 64 with dk != dv), SIMT in fp32 and in
# bf16, each forward and backward, causal multi-tile samples
ORDER_CASES = [(5, torch.bfloat16, "1"), (7, torch.float16, "1"), (5, torch.float32, "1"), (3, torch.bfloat16, "0")]


@pytest.mark.parametrize("case, dtype, mma", ORDER_CASES)
def test_thread_order_does_not_change_results(emu, case, dtype, mma, seed, monkeypatch):
    monkeypatch.setenv("LOOKFAST_CUDA_MMA", mma)
    results = []
    for order in (0, 1, 2):
        configure(90, order, seed)
        _, (out, lse, grads) = attention_both_ways(emu, case, dtype, seed)
        results.append([out, lse, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert same_bits(a, b)


def same_bits(a, b):
    """Bitwise equality (NaN, -inf and signed zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("mma", ["1", "0"], ids=["tensor-cores", "simt"])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("dk, dv", [(8, 8), (40, 72), (64, 64), (128, 128)])
def test_varlen_attention_writes_every_element(emu, dk, dv, dtype, mma, monkeypatch):
    configure(90)
    monkeypatch.setenv("LOOKFAST_CUDA_MMA", mma)
    check_outputs_fully_written([3, 0, 1, 130, 70], [5, 2, 0, 1, 140], 4, 2, dk, dv, dtype, ops=emu)


# ---------------------------------------------------------------------------------- the emulator catches bugs
def selftest(case, operands=None):
    operands = torch.zeros(2, 16, 16, dtype=torch.float16) if operands is None else operands
    return torch.ops.lookfast_cuda_emu_selftest.run(case, operands)


def test_emulator_runs_a_correct_kernel_in_every_order(emu):
    for order in (0, 1, 2):
        configure(90, order, 7)
        assert torch.equal(selftest(0), torch.arange(1, 65, dtype=torch.int32))


def test_emulator_exposes_a_missing_barrier(emu):
    # the race gives a wrong answer in at least one thread order (forward: every thread but the last reads a slot its
    # neighbour has not written yet)
    results = []
    for order in (0, 1, 2):
        configure(90, order, 7)
        results.append(selftest(1))
    assert any(not torch.equal(r, torch.arange(1, 65, dtype=torch.int32)) for r in results)


@pytest.mark.parametrize("case, message", [
    (2, "__syncthreads"),                     # a barrier half the block never reaches
    (3, "returned"),                          # a barrier one thread returned before
    (4, "past the end"),                      # a write past the dynamic shared memory
    (5, "cudaFuncSetAttribute"),              # 64 KB of dynamic shared memory without opting in
    (7, "returned"),                          # a shuffle half the warp has left
    (9, "32-byte aligned"),                   # a wmma load from a misaligned pointer
    (10, "divergent wmma|returned"),          # wmma by half a warp
])
def test_emulator_reports_bugs(emu, case, message):
    configure(90)
    with pytest.raises(RuntimeError, match=message):
        selftest(case)


def test_emulator_honours_cuda_func_set_attribute(emu):
    configure(90)
    assert torch.equal(selftest(6), torch.arange(1, 65, dtype=torch.int32))


def test_emulator_wmma_is_a_16x16x16_product(emu, seed):
    configure(90)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(16, 16, generator=g).half(), torch.randn(16, 16, generator=g).half()
    got = selftest(8, torch.stack([a, b.T.contiguous()]))  # b column-major: b^T row-major
    truth = a.double() @ b.double()
    assert (got.double() - truth).abs().max().item() <= 1e-5 * truth.abs().max().item()
