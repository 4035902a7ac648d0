"""The compiled library must be what runs: a build or load failure must fail CI, not fall back silently. And the
choice of backend (lookfast._backend): forced reference, the GPU preferences and their fallbacks, no triton on CPU."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import lookfast
from lookfast import _backend


def test_compiled_library_is_loaded():
    assert _backend.loaded, f"lookfast._C did not load: {_backend.load_error}"


def test_every_op_has_a_cpu_kernel():
    ops = _backend.registered_ops()
    assert ops, "the compiled library registered no lookfast ops"
    missing = [op for op in ops if not _backend.has_kernel(op, "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


def test_cpu_tensors_dispatch_to_cpp(monkeypatch):
    monkeypatch.delenv("LOOKFAST_BACKEND", raising=False)
    for op in _backend.registered_ops():
        assert _backend.backend_for(op, torch.device("cpu")) == _backend.LIBRARY, op


def test_reference_can_be_forced(monkeypatch):
    monkeypatch.setenv("LOOKFAST_BACKEND", "reference")
    assert _backend.backend_for("anything", torch.device("cpu")) == _backend.REFERENCE


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("LOOKFAST_BACKEND", "fastest")
    try:
        _backend.backend_for("anything", torch.device("cpu"))
    except ValueError as exc:
        assert "LOOKFAST_BACKEND" in str(exc)
    else:
        raise AssertionError("an unknown LOOKFAST_BACKEND was accepted")


def test_installed_kernels_package_imports():
    import lookfast.kernels  # noqa: F401  (Triton sources ship as lookfast.kernels)


def test_package_works_through_the_reference_without_the_library():
    # A build that failed or was never made must still import and compute, warning once per op (no silent slowdown).
    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("always")
        import torch, lookfast
        from lookfast import _backend
        assert not _backend.loaded, "LOOKFAST_NO_EXTENSION=1 was ignored"
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            images, scores = torch.randn(2, 3, 28, 28), torch.randn(2, 4)
            idx, tok = lookfast.topk_patch_gather(images, scores, 2, 14)
            assert idx.shape == (2, 2) and tok.shape == (2, 2, 3 * 14 * 14)
            q, k = torch.randn(5, 2, 8), torch.randn(3, 2, 8)
            cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32)
            out = lookfast.varlen_attention(q, k, k, cu_q, cu_k, 3, 2)
            assert out.shape == (5, 2, 8) and torch.isfinite(out).all()
            keep, exited, state = lookfast.exit_compact(torch.randn(4, 10), 0.5, torch.arange(4))
            assert keep.numel() + exited.numel() == 4 and torch.equal(state, keep)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("reference" in m for m in messages), messages
        print("ok")
        """
    )
    env = dict(os.environ, LOOKFAST_NO_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_every_library_op_belongs_to_a_family():
    # The dispatch reaches an op only through lookfast._backend.FAMILIES (and check_cuda_build checks the same list).
    listed = {op for ops in _backend.FAMILIES.values() for op in ops}
    assert set(_backend.registered_ops()) == listed


def test_the_compile_mark_is_torchs():
    # _backend marks its constant functions as torch.compiler.assume_constant_result does, without importing dynamo.
    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert [k for k in vars(marked)] == ["_dynamo_marked_constant"] and marked._dynamo_marked_constant is True
    assert _backend.backend_for._dynamo_marked_constant and _backend.has_kernel._dynamo_marked_constant


def _pretend_gpu(monkeypatch, cuda_kernel: bool, triton: bool):
    """Make the GPU choice see (or not) a compiled CUDA kernel and an importable triton; fresh warnings."""
    monkeypatch.delenv("LOOKFAST_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "has_kernel", lambda op, key: cuda_kernel if key == "CUDA" else True)
    monkeypatch.setattr(_backend, "triton_available", lambda: triton)
    monkeypatch.setattr(_backend, "load_triton", lambda op: None)
    monkeypatch.setattr(_backend, "_warned", set())


@pytest.mark.parametrize("preference", ["", "cuda", "triton"])
def test_gpu_choice(monkeypatch, preference):
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", preference)
    cuda = torch.device("cuda")
    want = {"": _backend.LIBRARY, "cuda": _backend.LIBRARY, "triton": _backend.TRITON}[preference]
    _pretend_gpu(monkeypatch, cuda_kernel=True, triton=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the preferred backend is there: no warning
        assert _backend.backend_for("varlen_attention_fwd", cuda) == want


def test_gpu_triton_preferred_but_missing_runs_the_cuda_kernel(monkeypatch):
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", "triton")
    _pretend_gpu(monkeypatch, cuda_kernel=True, triton=False)
    with pytest.warns(RuntimeWarning, match="triton is not installed; running the compiled CUDA kernel"):
        assert _backend.backend_for("varlen_attention_fwd", torch.device("cuda")) == _backend.LIBRARY


def test_gpu_cuda_preferred_but_missing_runs_triton(monkeypatch):
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", "cuda")
    _pretend_gpu(monkeypatch, cuda_kernel=False, triton=True)
    with pytest.warns(RuntimeWarning, match="no CUDA kernel was compiled .*; using Triton"):
        assert _backend.backend_for("varlen_attention_fwd", torch.device("cuda")) == _backend.TRITON


@pytest.mark.parametrize("preference", ["", "cuda", "triton"])
def test_gpu_without_kernels_or_triton_runs_the_reference(monkeypatch, preference):
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", preference)
    _pretend_gpu(monkeypatch, cuda_kernel=False, triton=False)
    with pytest.warns(RuntimeWarning, match="no compiled CUDA kernel .* and triton is not installed"):
        assert _backend.backend_for("varlen_attention_fwd", torch.device("cuda")) == _backend.REFERENCE


def test_unknown_gpu_backend_is_refused(monkeypatch):
    monkeypatch.delenv("LOOKFAST_BACKEND", raising=False)
    monkeypatch.setenv("LOOKFAST_GPU_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LOOKFAST_GPU_BACKEND"):
        _backend.backend_for("varlen_attention_fwd", torch.device("cuda"))


def test_cpu_use_never_imports_triton():
    # CPU users need no triton: importing lookfast and running every op (forward and backward) on CPU tensors must
    # not load it, even where it is installed.
    script = textwrap.dedent(
        """
        import sys
        import torch, lookfast
        from lookfast.ops.exit_compact import compact_rows
        torch.manual_seed(0)
        images = torch.randn(2, 3, 28, 28, requires_grad=True)
        weight = torch.randn(5, 3, 14, 14, requires_grad=True)
        scores = torch.randn(2, 4)
        lookfast.topk_indices(scores, 2), lookfast.topk_indices(scores, torch.tensor([1, 3]))
        idx, tok = lookfast.topk_patch_gather(images, scores, 2, 14, weight)
        _, tok2, _ = lookfast.topk_patch_gather(images, scores, torch.tensor([1, 3]), 14)
        q = torch.randn(5, 2, 8, requires_grad=True)
        k = torch.randn(3, 2, 8, requires_grad=True)
        cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 1, 3], dtype=torch.int32)
        out = lookfast.varlen_attention(q, k, k, cu_q, cu_k, 3, 2, causal=True)
        x = lookfast.cross_attention(torch.randn(2, 3, 2, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8),
                                     torch.tensor([2, 4]))
        state = torch.randn(4, 6, requires_grad=True)
        keep, exited, kept = lookfast.exit_compact(torch.randn(4, 10), 0.2, state, criterion="entropy")
        compact_rows([torch.arange(4)], keep)
        lookfast.exit_scatter(torch.zeros(4, 6), keep, kept.detach())
        (tok.sum() + tok2.sum() + out.sum() + x.sum() + kept.sum()).backward()
        loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
        assert not loaded, loaded
        assert set(lookfast._backend.last_backend.values()) == {"library"}, lookfast._backend.last_backend
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOOKFAST_BACKEND", "LOOKFAST_NO_EXTENSION")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
