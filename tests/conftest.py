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
