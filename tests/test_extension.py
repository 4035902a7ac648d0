"""The compiled library must be what runs: a build or load failure must fail CI, not fall back silently."""
import os

import lookfast
from lookfast import _dispatch, _ext

import torch


def test_compiled_library_is_loaded():
    assert _ext.loaded, f"lookfast._C did not load: {_ext.load_error}"


def test_every_op_has_a_cpu_kernel():
    ops = _ext.registered_ops()
    assert ops, "the compiled library registered no lookfast ops"
    missing = [op for op in ops if not _ext.has_kernel(op, "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


def test_cpu_tensors_dispatch_to_cpp(monkeypatch):
    monkeypatch.delenv("LOOKFAST_BACKEND", raising=False)
    for op in _ext.registered_ops():
        assert _dispatch.backend_for(op, torch.device("cpu")) == _dispatch.CPP, op


def test_reference_can_be_forced(monkeypatch):
    monkeypatch.setenv("LOOKFAST_BACKEND", "reference")
    assert _dispatch.backend_for("anything", torch.device("cpu")) == _dispatch.REFERENCE


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("LOOKFAST_BACKEND", "fastest")
    try:
        _dispatch.backend_for("anything", torch.device("cpu"))
    except ValueError as exc:
        assert "LOOKFAST_BACKEND" in str(exc)
    else:
        raise AssertionError("an unknown LOOKFAST_BACKEND was accepted")


def test_installed_kernels_package_imports():
    import lookfast.kernels  # noqa: F401  (Triton sources ship as lookfast.kernels)


def test_package_works_through_the_reference_without_the_library():
    # A build that failed or was never made must still import and compute, warning once per op (no silent slowdown).
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("always")
        import torch, lookfast
        from lookfast import _ext
        assert not _ext.loaded, "LOOKFAST_NO_EXTENSION=1 was ignored"
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
