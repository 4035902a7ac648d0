"""`python -m lookfast serve`: build the model, the engine and the HTTP server (server.py) from command-line flags."""
from __future__ import annotations

import argparse
import sys
import warnings

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: the model was built with random weights (--random-weights), its predictions are meaningless. "
    "Give --checkpoint PATH to serve a trained model.")


EPILOG = """examples:
  python -m lookfast serve --model dyn_perceiver:reg800m_perceiver_t128 --checkpoint reg800m_t128.pth \\
      --thresholds 0.8 0.7 0.6 0
  python -m lookfast serve --model lookwhere:dinov2 --checkpoint lookwhere_dinov2.pt --k-mass 0.5 --k-min 16
  python -m lookfast serve --model dyn_perceiver:reg800m_perceiver_t128 --random-weights   # try it untrained
  python -m lookfast serve ... --dtype bfloat16                # bf16 weights: faster on AVX512-BF16 / AMX CPUs
  curl -F file=@cat.jpg http://127.0.0.1:8000/v1/predict
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `serve` subcommand's flags, description and examples to parser `p` (the model, its weights, the
    engine and the HTTP server)."""
    p.description = ("Serve a model over HTTP: POST an image to /v1/predict, get its top-5 classes (and the exit or k "
                     "it took); GET /healthz. Requests are batched per stage by the engine, with early exit "
                     "(Dyn-Perceiver) or per-image k (LookWhere). Needs pip install 'lookfast[serve]'.")
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, metavar="FAMILY:NAME",
                   help="dyn_perceiver:<config> (e.g. dyn_perceiver:reg800m_perceiver_t128) or lookwhere:<dinov2|franca>")
    m.add_argument("--checkpoint", metavar="PATH", help="official checkpoint file of the model")
    m.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: random weights, for trying the server out (predictions are meaningless; "
                        "exactly one of --checkpoint and --random-weights)")
    m.add_argument("--seed", type=int, default=0, metavar="N",
                   help="with --random-weights: the seed of the weights (default 0; the same seed builds the same "
                        "weights in every process)")
    m.add_argument("--ops", choices=("fused", "reference"), default="fused",
                   help="model implementation: lookfast kernels or plain PyTorch (default fused)")
    from ..models.spec import add_dtype_argument

    add_dtype_argument(m, "answered")
    m.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default torch's)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-batch", type=int, default=32, metavar="N", help="most images per stage batch (default 32)")
    e.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                   help="how long a partial batch waits for more requests (default 2)")
    e.add_argument("--thresholds", type=float, nargs="+", metavar="T",
                   help="Dyn-Perceiver: one max-softmax threshold per exit (4, the last ignored); default no early exit")
    e.add_argument("--k", type=int, help="LookWhere: patches kept per image (default the model's k, 136)")
    e.add_argument("--k-mass", type=float, metavar="MASS",
                   help="LookWhere: per image, the fewest patches holding this share of the selector's score mass, "
                        "in (0, 1]")
    e.add_argument("--k-min", type=int, default=1, metavar="K", help="LookWhere: smallest k with --k-mass (default 1)")
    e.add_argument("--k-max", type=int, metavar="K", help="LookWhere: largest k with --k-mass (default every patch)")
    e.add_argument("--max-tokens", type=int, metavar="N",
                   help="LookWhere: token budget of one extractor pack (default max-batch x (prefix tokens + k, or "
                        "+ k-max with --k-mass))")
    e.add_argument("--high-res-size", type=int, default=518, metavar="PX",
                   help="LookWhere: input size, a multiple of 14 (default 518)")
    e.add_argument("--num-classes", type=int, default=1000, metavar="N",
                   help="LookWhere: classifier classes (default 1000; the head is freshly initialised when the "
                        "checkpoint has none)")
    h = p.add_argument_group("HTTP server")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    h.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    h.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB", help="largest accepted upload (default 20)")
    h.add_argument("--graceful-timeout", type=float, metavar="S",
                   help="on SIGTERM, wait at most S seconds for requests in flight (default: as long as they take)")
    h.add_argument("--log-level", default="info", help="uvicorn log level (default info)")


def main(args: argparse.Namespace) -> int:
    """Run `python -m lookfast serve` with the parsed `args` until SIGTERM / Ctrl-C. Returns the exit status: 0 after
    a clean shutdown, 2 when the serve extra is missing or the flags are refused (one line on stderr)."""
    try:
        from . import server
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from ..images import transform_for
    from ..models.spec import ModelSpec, split_model_name
    from .engine import Engine

    try:
        if (args.checkpoint is None) == (not args.random_weights):
            raise ValueError("give either --checkpoint PATH or --random-weights (exactly one)")
        family, _ = split_model_name(args.model)
        options = {"ops": args.ops}
        if family == "lookwhere":
            options.update(high_res_size=args.high_res_size, k=args.k if args.k is not None else 136,
                           num_classes=args.num_classes)
        spec = ModelSpec.parse(args.model, args.checkpoint, args.random_weights, options, seed=args.seed,
                               dtype=args.dtype)
        if spec.family == "dyn_perceiver":
            for flag in ("k", "k_mass", "k_max", "max_tokens"):
                if getattr(args, flag) is not None:
                    raise ValueError(f"--{flag.replace('_', '-')} applies to lookwhere models, not {args.model}")
        elif args.thresholds is not None:
            raise ValueError(f"--thresholds applies to dyn_perceiver models, not {args.model}")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.random_weights:
            banner = "!" * 100
            print(f"{banner}\n!! WARNING: {RANDOM_WEIGHTS_WARNING}\n{banner}", file=sys.stderr, flush=True)
            warnings.warn(RANDOM_WEIGHTS_WARNING, stacklevel=1)
        model = spec.load()
        kw = {}
        if spec.family == "lookwhere":
            kw = dict(k=args.k, k_mass=args.k_mass, k_min=args.k_min, k_max=args.k_max, max_tokens=args.max_tokens)
        engine = Engine(model, max_batch=args.max_batch, thresholds=args.thresholds, max_wait_ms=args.max_wait_ms,
                        **kw)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = server.create_app(engine, transform_for(model), args.model, random_weights=args.random_weights,
                            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    try:
        server.serve(app, engine, args.host, args.port, log_level=args.log_level, graceful_timeout_s=args.graceful_timeout)
    finally:
        engine.close()
    return 0
