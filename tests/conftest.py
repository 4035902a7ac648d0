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


def _fix_interpreter_bf16_rounding() -> None:
    """Triton's interpreter (3.9) casts float32 to bfloat16 by truncating the mantissa (round toward zero), where a
    GPU rounds to nearest even (cvt.rn.bf16.f32): every bf16 result would carry up to a full ulp of error instead of
    half of one, and the accuracy tests would judge the emulator, not the kernel. Round to nearest even instead.
    Applied only when the interpreter truncates (a probe cast)."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder_cls = interpreter.InterpreterBuilder
    original = builder_cls.cast_impl

    def probe(cast):
        x = interpreter.TensorHandle(np.array([1.005859375], dtype=np.float32), tl.float32)  # 1 + 0.75 ulp of bf16
        y = cast(builder_cls.__new__(builder_cls), x, tl.bfloat16)
        return int(np.asarray(y.data).view(np.uint16)[0])

    if probe(original) == 0x3F81:  # 1.0078125: already rounds to nearest
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
            rounded = np.where(np.isnan(np.asarray(src.data)), np.uint16(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original(self, src, dst_type)

    assert probe(cast_impl) == 0x3F81
    builder_cls.cast_impl = cast_impl
    for name in ("create_fp_trunc", "create_fp_ext", "create_si_to_fp", "create_ui_to_fp", "create_fp_to_si",
                 "create_fp_to_ui"):
        setattr(builder_cls, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))


def _fix_interpreter_scalar_index() -> None:
    """Triton's interpreter (3.6) turns a scalar tensor into a Python int (`range(0, n, BLOCK)` over a runtime `n`)
    with `int(handle.data)`, and its scalars are 1-element arrays, which NumPy 2.4 no longer converts (TypeError:
    only 0-dimensional arrays can be converted to Python scalars): every kernel with such a loop fails on CPU. Later
    Triton squeezes the array first; do the same. Applied only where NumPy refuses (a probe) and the interpreter has
    the hook this patches."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this NumPy still converts 1-element arrays
    except TypeError:
        pass
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_bf16_dot()
    _fix_interpreter_bf16_rounding()
    _fix_interpreter_scalar_index()


# ------------------------------------------------------------------------------ CUDA kernels on the CPU emulator
_EMULATOR_ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
_emulator_setting: str | None = None


def pytest_configure(config):
    """LOOKFAST_TEST_CUDA_EMULATOR=<sm>[,<order>] (sm 90, 80 or 75; order forward, reverse or shuffled): for this
    whole run, lookfast's library ops that have CUDA kernels run those kernels (with their host code) on CPU tensors,
    in the CUDA emulator of tests/cuda_emulator, in place of the C++ CPU kernels; every op test of the `library`
    backend then tests the CUDA kernels. .ci/run does it for the op test files."""
    global _emulator_setting
    spec = os.environ.get("LOOKFAST_TEST_CUDA_EMULATOR", "")
    if not spec:
        return
    sm, _, order = spec.partition(",")
    order = order or "forward"
    if sm not in ("90", "80", "75") or order not in _EMULATOR_ORDERS:
        raise pytest.UsageError(f"LOOKFAST_TEST_CUDA_EMULATOR={spec!r}: want <90|80|75>[,forward|reverse|shuffled]")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emulator"))
    import build

    build.load(override=True)
    torch.ops.lookfast_cuda_emu_control.configure(int(sm), _EMULATOR_ORDERS[order], 0)
    _emulator_setting = f"sm_{sm}, threads in {order} order"


def pytest_report_header(config):
    if _emulator_setting is not None:
        return (f"lookfast: the library ops with CUDA kernels run them in the CPU emulator ({_emulator_setting}), "
                "in place of the C++ CPU kernels")
    return None


def pytest_collection_modifyitems(config, items):
    # runs of the `backend` fixture on CUDA tensors need a GPU like the marked tests: mark them, so that `-m gpu`
    # (python -m lookfast gpucheck) selects them too
    for item in items:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("backend") if callspec is not None else None
        if isinstance(param, tuple) and len(param) == 2 and param[1] == "cuda":
            item.add_marker(pytest.mark.gpu)
    if _emulator_setting is not None:
        skip_cpu_kernel = pytest.mark.skip(reason="checks the C++ CPU kernel itself, which the CUDA emulator replaces")
        for item in items:
            if item.get_closest_marker("cpu_kernel") is not None:
                item.add_marker(skip_cpu_kernel)
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
    """A fresh seed per test run (printed on failure through the test id's output), so random cases vary run to run;
    LOOKFAST_TEST_SEED=<n> replays a printed one."""
    value = int(os.environ.get("LOOKFAST_TEST_SEED", 0)) or int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed={value}")
    return value


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A generated image folder (image_files.make_folder), one per test module: (root, good paths, corrupt paths)."""
    from image_files import make_folder

    root = tmp_path_factory.mktemp("images")
    good, corrupt = make_folder(str(root))
    return str(root), good, corrupt


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
