"""`python -m lookfast.check_cuda_build`: asserts that this install was built with CUDA and that every lookfast op has a
CUDA kernel registered. Needs no GPU (the library loads without one); CI runs it after a CUDA build."""
from __future__ import annotations

import sys


def main() -> int:
    import torch

    from . import _ext

    if not _ext.loaded:
        print(f"FAIL: lookfast._C did not load: {_ext.load_error}")
        return 1
    if torch.version.cuda is None:
        print(f"FAIL: torch {torch.__version__} is not a CUDA build")
        return 1
    ops = _ext.registered_ops()
    missing = [op for op in ops if not _ext.has_kernel(op, "CUDA")]
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {len(ops)} lookfast ops: {', '.join(ops)}")
    if not ops:
        print("FAIL: no lookfast ops registered")
        return 1
    if missing:
        print(f"FAIL: ops without a CUDA kernel: {', '.join(missing)}")
        return 1
    print("OK: every lookfast op has a CUDA kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
