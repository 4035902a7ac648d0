"""The one launch helper of the Triton kernel files: `launch(kernel)[grid](...)`."""
from __future__ import annotations

import torch

try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # a Triton without the interpreter module: nothing is interpreted
    _Interpreted = ()


def launch(kernel):
    """`kernel` wrapped by `torch.library.wrap_triton` (so a traced `triton_op` can see the launch; in eager it just
    launches). Under TRITON_INTERPRET=1, `triton.jit` gives interpreted functions, which torch 2.12 and later pass
    through wrap_triton unchanged and torch 2.11 refuses ("wrap_triton only works on functions annotated with
    triton.jit"): they are returned as they are here, on every torch."""
    if isinstance(kernel, _Interpreted):
        return kernel
    return torch.library.wrap_triton(kernel)
