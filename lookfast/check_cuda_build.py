"""`python -m lookfast.check_cuda_build`: asserts that this install was built with CUDA and that every lookfast op has a
CUDA kernel registered. Needs no GPU (the library loads without one); CI runs it after a CUDA build."""
from __future__ import annotations

import sys


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
    missing = [op for op in expected if not _backend.has_kernel(op, "CUDA")]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
