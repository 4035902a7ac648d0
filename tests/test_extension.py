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
