"""The machine's ceilings, measured in the same run as the cases: copy bandwidth and the fp32 and bf16
matrix-multiply rates; and the CPU's matrix features, which decide the default precision of the suite."""
from __future__ import annotations

import torch

from .timing import measure


def copy_bandwidth_gbs(megabytes: int = 256, min_seconds: float = 0.5) -> float:
    """GB/s of `dst.copy_(src)` on float32 buffers far larger than the caches, counting bytes read and written."""
    n = megabytes * (1 << 20) // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), min_seconds)["median"]
    return 2 * n * 4 / t / 1e9


def matmul_gflops(n: int = 2048, min_seconds: float = 0.5, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a large `torch.mm` (2 n^3 flops) in `dtype` (bf16 runs on AMX / AVX512-BF16 where the CPU has
    them, through oneDNN, with fp32 accumulation)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    t = measure(lambda: torch.mm(a, b, out=out), min_seconds)["median"]
    return 2 * n**3 / t / 1e9


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def matrix_features() -> list[str]:
    """The CPU's low-precision matrix features, strongest first: "AMX-BF16", "AMX-FP16", "AVX512-BF16",
    "AVX512-FP16"; empty when it has none (bf16 then runs as fp32 FMAs). Asks torch's cpuinfo, then /proc/cpuinfo."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older torch: no get_capabilities
        caps = {}
    flags = _cpuinfo_flags()
    names = [("amx_bf16", "AMX-BF16"), ("amx_fp16", "AMX-FP16"), ("avx512_bf16", "AVX512-BF16"),
             ("avx512_fp16", "AVX512-FP16")]
    return [label for key, label in names if caps.get(key) or key in flags]


def has_bf16_matrix_engine() -> bool:
    """True where bf16 products run faster than fp32 ones: AMX-BF16 or AVX512-BF16."""
    return any(f in ("AMX-BF16", "AVX512-BF16") for f in matrix_features())


def default_dtypes() -> list[torch.dtype]:
    """The suite's precision when `--dtype` is not given: bf16 where the CPU has a bf16 matrix engine, else fp32."""
    return [torch.bfloat16] if has_bf16_matrix_engine() else [torch.float32]
