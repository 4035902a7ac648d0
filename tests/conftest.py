"""Test setup. TRITON_INTERPRET must be set before any @triton.jit module is imported, so it is set here, first.

Tests import `lookfast` as installed (README: `pip install --no-build-isolation .`); in a source checkout built with
`python setup.py build_ext --inplace`, run them with `PYTHONPATH=. pytest tests`.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _fix_interpreter_bf16_dot() -> None:
    """Triton's interpreter (3.9) stores bfloat16 tensors as their raw uint16 bits and its tl.dot multiplies those
    bits as integers, so every bf16 tensor-core dot is garbage on CPU. Widen bf16 operands to float32 first (exact)
    and accumulate in the accumulator's dtype, which is what the GPU's bf16 mma does (exact products, fp32 sums).
    Applied only when the bug is present (a probe dot), so a fixed Triton runs its own code."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder_cls = interpreter.InterpreterBuilder
    original = builder_cls.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (np.asarray(handle.data).astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def probe(dot):
        one = interpreter.TensorHandle(np.full((1, 1), 0x3F80, dtype=np.uint16), tl.bfloat16)  # bf16 1.0
        acc = interpreter.TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
        return float(dot(None, one, one, acc, None, 0).data[0, 0])

    if probe(original) == 1.0:
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    assert probe(create_dot) == 1.0
    builder_cls.create_dot = create_dot
    builder_cls._lookfast_bf16_dot_fixed = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_bf16_dot()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        # the marker itself, not `"gpu" in item.keywords`: keywords include the checkout's directory names, so a
        # clone in a folder called gpu/ would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure through the test id's output), so random cases vary run to run."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed={value}")
    return value
