"""Command line:
- `python -m lookfast bench [--quick] [--json PATH] [--only ID ...] [--threads N ...] [--plot PNG]
  [--dtype float32|bfloat16|all] [--keep-freed-memory]`: the benchmark suite;
- `python -m lookfast info`: which backends and kernels this install has;
- `python -m lookfast serve --model ...`: the HTTP server (needs `pip install 'lookfast[serve]'`, see lookfast/serving);
- `python -m lookfast infer`: batch inference over image folders (`python -m lookfast infer --help`);
- `python -m lookfast gpucheck [--json PATH]`: on a CUDA GPU, the GPU-marked tests and the bf16/fp16 GPU benchmark
  rows (see lookfast/gpucheck.py)."""
from __future__ import annotations

import argparse
import sys


def _info() -> int:
    import torch

    from . import _backend

    print(f"lookfast {__import__('lookfast').__version__}, torch {torch.__version__}")
    print(f"compiled library: {_backend.library_path if _backend.loaded else 'not loaded: ' + str(_backend.load_error)}")
    triton = _backend.triton_available()
    print(f"triton available: {triton}")
    for family, ops in _backend.FAMILIES.items():
        print(f"{family}:")
        for op in ops:
            keys = [k for k in ("CPU", "CUDA") if _backend.has_kernel(op, k)]
            print(f"  lookfast::{op}: library {', '.join(keys) or 'missing'}; "
                  f"CPU tensors run {_backend.backend_for(op, torch.device('cpu'))}")
        if family in _backend.MODEL_INTERNAL:
            print("  CPU-only, called by the models (docs/ops.md section 6): on GPUs the models run torch's ops")
            continue
        if all(op in _backend.CPU_ONLY for op in ops):
            print("  CPU-only: GPU tensors run the pure-PyTorch reference")
            continue
        print(f"  Triton ops (lookfast::<op>_triton, lookfast.kernels.{family}): "
              f"{'loaded on first GPU use' if triton else 'unavailable (triton not installed)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lookfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark suite and print one table")
    bench.add_argument("--quick", action="store_true", help="the short suite (under two minutes on 2 cores)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--only", nargs="+", metavar="ID", help="run only these case ids (G1, A3, ...) or op names")
    bench.add_argument("--threads", nargs="+", type=int, help="intra-op thread counts, every case at each (default: 1; full run: 1 2, "
                       "model and serving cases at 1 only)")
    bench.add_argument("--plot", metavar="PNG", help="write a speedup plot (needs matplotlib)")
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "all"], default=None,
                       help="precision of the cases that have variants (ids of low-precision variants end in -bf16); "
                            "default: bfloat16 where the CPU has AMX or AVX512-BF16, else float32")
    bench.add_argument("--keep-freed-memory", action="store_true",
                       help="call lookfast.keep_freed_cpu_memory() first (every row, peers included, then runs "
                            "without glibc's page faults on freed activations; default: the allocator as a plain "
                            "process has it)")
    sub.add_parser("info", help="show the compiled backends and registered kernels")
    from .serving.cli import add_arguments as serve_arguments

    serve_arguments(sub.add_parser("serve", help="serve a model over HTTP (needs the serve extra)"))
    from .infer import cli as infer_cli

    infer_cli.add_parser(sub)
    sub.add_parser("gpucheck", add_help=False,
                   help="on a CUDA GPU: run the GPU-marked tests and the bf16/fp16 GPU benchmark rows (--help for options)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "gpucheck":
        from .gpucheck import main as gpucheck

        return gpucheck(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return _info()
    from .memory import keep_freed_cpu_memory

    if args.command in ("serve", "infer") or getattr(args, "keep_freed_memory", False):
        # Long-running inference: reuse freed activations instead of page-faulting fresh memory (lookfast.memory).
        # The bench leaves the allocator as a plain process has it unless asked: it changes the peers' times too.
        applied = keep_freed_cpu_memory()
        if args.command == "bench":
            print(f"allocator: --keep-freed-memory {'applied' if applied else 'not available here (glibc only)'}")
    if args.command == "serve":
        from .serving.cli import main as serve_main

        return serve_main(args)
    if args.command == "infer":
        return infer_cli.main(args)
    from .benchmarks.run import main as run_bench

    from .benchmarks.case import DTYPE_NAMES

    dtypes = None
    if args.dtype == "all":
        dtypes = [DTYPE_NAMES["float32"], DTYPE_NAMES["bfloat16"]]
    elif args.dtype:
        dtypes = [DTYPE_NAMES[args.dtype]]
    return run_bench(args.quick, args.json, args.only, args.threads, args.plot, dtypes)


if __name__ == "__main__":
    sys.exit(main())
