"""Builds lookfast's CUDA kernels (csrc/cuda) for the CPU emulator (cuda_emulator.h) and loads them as the op
namespace torch.ops.lookfast_cuda_emu: the same schemas as torch.ops.lookfast (csrc/lookfast.cpp), the CUDA kernels
and their host code registered for CPU tensors. Used by tests/test_cuda_emulated.py; nothing here is installed.

The rewrite from CUDA to C++ is textual and small: kernel<<<grid, block, smem, stream>>>(args) becomes
lookfast_emu::launch(kernel, grid, block, smem, stream, args); `extern __shared__ ... name[];` becomes a pointer to the
block's dynamic shared memory; at::mm(a, b, out_dtype) (CUDA-only in ATen) becomes the same product on the CPU; the
CUDA headers become cuda_emulator.h; `.is_cuda()` checks accept CPU tensors (the
emulated device's memory is the host's); the library namespaces are renamed so the real and the emulated kernels can
live in one process."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"

_CUDA_HEADERS = re.compile(r"#include <(cuda_bf16\.h|cuda_fp16\.h|mma\.h|cuda_runtime\.h|c10/cuda/[A-Za-z]+\.h)>")
_EXTERN_SMEM = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+(\w+)\[\];")


def _callee_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends at text[end] (before `<<<`): a name with template arguments."""
    i = end
    if text[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(text: str) -> str:
    """kernel<<<a, b, c, d>>>(args) -> ::lookfast_emu::launch(kernel, a, b, c, d, args)."""
    out, pos = [], 0
    while (start := text.find("<<<", pos)) >= 0:
        close = text.index(">>>", start)
        paren = text.index("(", close)
        if text[close + 3:paren].strip():
            raise ValueError(f"unexpected text between >>> and ( at {text[close:paren + 1]!r}")
        callee = _callee_start(text, start)
        config = text[start + 3:close]
        if config.count(",") < 3:
            raise ValueError(f"launch without shared memory and stream: {text[callee:close + 3]!r}")
        out.append(text[pos:callee])
        out.append(f"::lookfast_emu::launch({text[callee:start]}, {config}, ")
        pos = paren + 1
    out.append(text[pos:])
    return "".join(out)


def _split_args(text: str, open_paren: int) -> tuple[list[str], int]:
    """The top-level comma-separated arguments of the call whose '(' is at open_paren, and the index of its ')'."""
    depth, start, args = 0, open_paren + 1, []
    for i in range(open_paren, len(text)):
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                args.append(text[start:i])
                return args, i
        elif ch == "," and depth == 1:
            args.append(text[start:i])
            start = i + 1
    raise ValueError("unbalanced call")


def rewrite_mm_out_dtype(text: str) -> str:
    """at::mm(a, b, dtype) (aten::mm.dtype, CUDA-only: cuBLAS's 16-bit GEMM into an fp32 result) ->
    lookfast_emu::mm_out_dtype(a, b, dtype), the same math on the CPU."""
    out, pos = [], 0
    while (at := text.find("at::mm(", pos)) >= 0:
        args, close = _split_args(text, at + len("at::mm"))
        out.append(text[pos:at])
        name = "::lookfast_emu::mm_out_dtype" if len(args) == 3 else "at::mm"
        out.append(f"{name}({','.join(args)})")
        pos = close + 1
    out.append(text[pos:])
    return "".join(out)


def translate(text: str, override: bool = False) -> str:
    """One source file of csrc/cuda (or csrc/lookfast.cpp) as C++ for the emulator; `override` registers the kernels
    as lookfast's CPU kernels (replacing the C++ CPU ones in this process) instead of in lookfast_cuda_emu."""
    text = _CUDA_HEADERS.sub('#include "cuda_emulator.h"', text)
    text = _EXTERN_SMEM.sub(r"unsigned char* const \1 = ::lookfast_emu::dynamic_smem();", text)
    text = rewrite_launches(text)
    text = rewrite_mm_out_dtype(text)
    text = text.replace(".is_cuda()", ".is_cpu()")
    target = "lookfast" if override else "lookfast_cuda_emu"
    text = text.replace("TORCH_LIBRARY_IMPL(lookfast, CUDA, m)", f"TORCH_LIBRARY_IMPL({target}, CPU, m)")
    text = text.replace("TORCH_LIBRARY(lookfast_cuda, m)", "TORCH_LIBRARY(lookfast_cuda_emu_diag, m)")
    text = text.replace("TORCH_LIBRARY(lookfast, m)", "TORCH_LIBRARY(lookfast_cuda_emu, m)")
    return '#include "cuda_emulator.h"\n#line 1\n' + text if "cuda_emulator.h" not in text else text


def _sources(override: bool) -> list[Path]:
    # overriding: the schemas are lookfast._C's; the self-test kernels live in the namespaced build only
    extra = [] if override else [CSRC / "lookfast.cpp", HERE / "selftest.cu"]
    return sorted((CSRC / "cuda").iterdir()) + extra + [HERE / "cuda_emulator.h", HERE / "control.cpp"]


def build_dir(override: bool = False) -> Path:
    digest = hashlib.sha256(b"override" if override else b"namespace")
    for path in _sources(override) + [Path(__file__)]:
        digest.update(path.name.encode() + path.read_bytes())
    base = Path(os.environ.get("LOOKFAST_EMU_BUILD_DIR", Path(tempfile.gettempdir()) / "lookfast-cuda-emulator"))
    return base / digest.hexdigest()[:16]


def load(override: bool = False, verbose: bool = False):
    """Translates and compiles (once per source state; cached under the temp dir, or LOOKFAST_EMU_BUILD_DIR) and
    loads the emulated CUDA library. Returns torch.ops.lookfast_cuda_emu, or with `override` (lookfast must be
    imported first) torch.ops.lookfast, whose CUDA-backed ops then run the emulated CUDA kernels on CPU tensors for
    the rest of the process. Settings: torch.ops.lookfast_cuda_emu_control.configure(sm, order, seed)."""
    import torch
    from torch.utils import cpp_extension

    if override:
        import lookfast  # noqa: F401  (its library defines the schemas the emulated kernels register under)
        from lookfast import _backend

        if not _backend.loaded:
            raise RuntimeError(f"the emulated CUDA kernels override lookfast._C's, which is not loaded: "
                               f"{_backend.load_error}")
    out = build_dir(override)
    src = out / "src"
    (src / "cuda").mkdir(parents=True, exist_ok=True)
    sources = []
    for path in _sources(override):
        if path.suffix in (".cu", ".cuh", ".h") and path.parent.name == "cuda":
            dest = src / "cuda" / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)
        else:
            dest = src / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)
        text = path.read_text()
        cuda_source = path.parent.name == "cuda" or path.suffix == ".cu" or path.name == "lookfast.cpp"
        dest.write_text(translate(text, override) if cuda_source else text)
        if dest.suffix == ".cpp":
            sources.append(str(dest))
    cpp_extension.load(
        name="lookfast_cuda_emu_override" if override else "lookfast_cuda_emu",
        sources=sources,
        extra_include_paths=[str(src), str(CSRC)],
        extra_cflags=["-O2", "-std=c++17", "-DLOOKFAST_CUDA_EMULATOR=1"],
        build_directory=str(out),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.lookfast if override else torch.ops.lookfast_cuda_emu
