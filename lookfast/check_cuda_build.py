"""`python -m lookfast.check_cuda_build`: asserts that this install was built with CUDA and that every lookfast op has a
CUDA kernel registered, and (when a cuobjdump is found: CUDA_HOME/bin, PATH, or the one Triton bundles) that no CUDA
kernel of the library spills registers or uses a stack, and that every tensor-core (`*_mma_kernel`) kernel holds HMMA
instructions for every architecture it was built for. Needs no GPU (the library loads without one); CI runs it after a
CUDA build."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Optional


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from CUDA_HOME/bin, PATH, or Triton's bundled copy; None when there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def kernel_report(library: str, cuobjdump: str) -> list:
    """Problems of the CUDA kernels in `library`: a stack frame (cuobjdump --dump-resource-usage STACK: register spills
    and run-time indexed local arrays live there) or local memory, and tensor-core kernels (`_mma_kernel` in the name) without HMMA instructions, one line each per architecture."""
    def dump(flag):
        return subprocess.run([cuobjdump, flag, library], capture_output=True, text=True, check=True).stdout

    problems, arch, function = [], "?", None
    for line in dump("--dump-resource-usage").splitlines():
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            function = m.group(1)
        m = re.search(r"STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if m and function and (int(m.group(1)) or int(m.group(2))):
            problems.append(f"{arch} {function}: stack {m.group(1)} bytes, local {m.group(2)} bytes")
    hmma, arch, function = {}, "?", None
    for line in dump("-sass").splitlines():
        if line.strip().startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        m = re.search(r"Function : (\S+)", line)
        if m:
            function = m.group(1)
            if "_mma_kernel" in function:
                hmma.setdefault((arch, function), 0)
        elif function and "HMMA" in line and (arch, function) in hmma:
            hmma[(arch, function)] += 1
    problems += [f"{a} {f}: no HMMA (tensor-core) instruction" for (a, f), n in hmma.items() if n == 0]
    if not hmma:
        problems.append("no tensor-core (_mma_kernel) kernel found in the library")
    return problems


def main() -> int:
    import torch

    from . import _backend

    if not _backend.loaded:
        print(f"FAIL: lookfast._C did not load: {_backend.load_error}")
        return 1
    if torch.version.cuda is None:
        print(f"FAIL: torch {torch.__version__} is not a CUDA build")
        return 1
    ops = _backend.registered_ops()
    expected = [op for family in _backend.FAMILIES.values() for op in family]
    missing = [op for op in expected if op not in _backend.CPU_ONLY and not _backend.has_kernel(op, "CUDA")]
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {len(ops)} lookfast ops: {', '.join(ops)}")
    if not ops:
        print("FAIL: no lookfast ops registered")
        return 1
    unknown = sorted(set(ops) - set(expected))
    if unknown:
        print(f"FAIL: library ops lookfast._backend.FAMILIES does not list (no dispatch would reach them): {', '.join(unknown)}")
        return 1
    if missing:
        print(f"FAIL: ops without a CUDA kernel: {', '.join(missing)}")
        return 1
    print("OK: every lookfast op has a CUDA kernel")
    # the diagnostic with which the GPU tests check that bf16/fp16 attention ran on the tensor cores
    try:
        last = torch.ops.lookfast_cuda.varlen_attention_last_kernel(False)
    except (AttributeError, RuntimeError) as e:
        print(f"FAIL: torch.ops.lookfast_cuda.varlen_attention_last_kernel is missing ({e})")
        return 1
    if last != "":
        print(f"FAIL: varlen_attention_last_kernel says {last!r} before any call (expected '')")
        return 1
    print("OK: torch.ops.lookfast_cuda.varlen_attention_last_kernel is registered")
    cuobjdump = find_cuobjdump()
    library = _backend.library_path
    if cuobjdump is None or library is None:
        print(f"SKIP kernel resource check: cuobjdump {cuobjdump}, library {library}")
        return 0
    problems = kernel_report(library, cuobjdump)
    if problems:
        print("FAIL: CUDA kernels that spill, use a stack, or miss their tensor-core instructions:\n  "
              + "\n  ".join(problems))
        return 1
    print(f"OK: no CUDA kernel spills or uses a stack; every _mma_kernel holds HMMA ({library})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
