"""Test setup. TRITON_INTERPRET must be set before any @triton.jit module is imported, so it is set here, first.

Tests import `lookfast` as installed (README: `pip install --no-build-isolation .`); in a source checkout built with
`python setup.py build_ext --inplace`, run them with `PYTHONPATH=. pytest tests`.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure through the test id's output), so random cases vary run to run."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed={value}")
    return value


class Backend:
    """One backend the public functions can run on: `name` ("reference", "library", "triton"), the `device` its
    tensors live on, and `ran(op)`: whether the latest call of library op `op` ran on this backend."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, torch.device(device)

    def ran(self, op: str) -> bool:
        from lookfast import _backend

        return _backend.last_backend.get(op) == self.name

    def __repr__(self):
        return f"{self.name}-{self.device.type}"


def _backend_params():
    params = [("reference", "cpu"), ("library", "cpu"), ("triton", "cpu")]
    if torch.cuda.is_available():
        params += [("library", "cuda"), ("triton", "cuda")]
    return [pytest.param(p, id=f"{p[0]}-{p[1]}") for p in params]


@pytest.fixture(params=_backend_params())
def backend(request, monkeypatch):
    """Runs the test body once per backend present: the pure-PyTorch reference, the compiled library (C++ on CPU
    tensors; CUDA where a GPU is), and Triton (under TRITON_INTERPRET=1 on CPU tensors; compiled on a GPU). Skips,
    saying why, a backend this install lacks. The body uses `backend.device` and can assert `backend.ran(op)`."""
    from lookfast import _backend

    name, device = request.param
    monkeypatch.delenv("LOOKFAST_BACKEND", raising=False)
    if name == "triton":
        pytest.importorskip("triton")
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    if name == "library" and not _backend.loaded:
        pytest.skip(f"lookfast._C not loaded: {_backend.load_error}")
    _backend.last_backend.clear()
    if device == "cuda":  # the real choice, steered by the user's switch
        monkeypatch.setenv("LOOKFAST_GPU_BACKEND", "cuda" if name == "library" else name)
        yield Backend(name, device)
    else:
        with _backend.forced(name):
            yield Backend(name, device)
