"""`python -m lookfast serve`: build the model, the engine and the HTTP server (server.py) from command-line flags."""
from __future__ import annotations

import argparse
import sys
import warnings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FAMILY:NAME",
                   help="dyn_perceiver:<config> (e.g. dyn_perceiver:reg800m_perceiver_t128) or lookwhere:<dinov2|franca>")
    p.add_argument("--checkpoint", metavar="PATH", help="official checkpoint file of the model")
    p.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: random weights, for trying the server out (predictions are meaningless)")
    p.add_argument("--seed", type=int, help="with --random-weights: seed torch's generator first (reproducible weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--ops", choices=("fused", "reference"), default="fused", help="model implementation")
    p.add_argument("--max-batch", type=int, default=32, help="engine: most images per stage batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="engine: how long a partial batch waits")
    p.add_argument("--thresholds", type=float, nargs="+", metavar="T",
                   help="Dyn-Perceiver: one max-softmax threshold per exit (4, the last ignored); default no early exit")
    p.add_argument("--k", type=int, help="LookWhere: patches kept per image (default the model's k)")
    p.add_argument("--k-mass", type=float, help="LookWhere: per-image k from the selector's score mass")
    p.add_argument("--k-min", type=int, default=1, help="LookWhere: smallest k with --k-mass")
    p.add_argument("--k-max", type=int, help="LookWhere: largest k with --k-mass")
    p.add_argument("--max-tokens", type=int, help="LookWhere: token budget of one extractor pack")
    p.add_argument("--high-res-size", type=int, default=518, help="LookWhere: input size (multiple of 14)")
    p.add_argument("--num-classes", type=int, default=1000, help="LookWhere: classifier classes")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default torch's)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload")
    p.add_argument("--graceful-timeout", type=float, help="on SIGTERM, wait at most this many seconds for requests")
    p.add_argument("--log-level", default="info", help="uvicorn log level")


def main(args: argparse.Namespace) -> int:
    try:
        from . import server
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from ..images import transform_for
    from .engine import Engine
    from .model_spec import RANDOM_WEIGHTS_WARNING, load_model, parse_model_spec

    try:
        family, name = parse_model_spec(args.model)
        if family == "dyn_perceiver":
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
        if args.seed is not None:
            torch.manual_seed(args.seed)
        model = load_model(args.model, args.checkpoint, args.random_weights, ops=args.ops,
                           high_res_size=args.high_res_size, k=args.k if args.k is not None else 136,
                           num_classes=args.num_classes)
        kw = {}
        if family == "lookwhere":
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
