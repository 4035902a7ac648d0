"""`python -m lookfast infer`: the argument parser and the command (see README, "Batch inference")."""
from __future__ import annotations

import argparse
import json
import os
import sys

EPILOG = """examples:
  python -m lookfast infer --model dyn_perceiver:reg800m_perceiver_t128 --checkpoint reg800m_t128.pth \\
      --input val/ --output preds.parquet --thresholds 0.8 0.7 0.6
  python -m lookfast infer --model lookwhere:dinov2 --checkpoint lw_in1k.pt --num-classes 1000 \\
      --input 'val/**/*.JPEG' --output preds.jsonl --k-mass 0.5 --k-min 16
  python -m lookfast infer ... --dtype bfloat16              # bf16 weights: faster on AVX512-BF16 / AMX CPUs
  python -m lookfast infer ... --ray local --actors 2        # the same job on Ray Data
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `infer` subcommand (its flags, help and examples) to an argparse `subparsers` and return its parser."""
    p = subparsers.add_parser(
        "infer", help="predict every image of a folder or glob pattern into Parquet / JSON Lines",
        description="Decode images with the model's official evaluation transform, run them (with early exit or "
                    "ragged k) and write one row per image: path, top5, exit_index, k, mask, error.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, metavar="FAMILY:NAME",
                   help="dyn_perceiver:<config> (e.g. dyn_perceiver:reg800m_perceiver_t128) or lookwhere[:dinov2|franca]")
    weights = m.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", metavar="PATH", help="the official checkpoint file")
    weights.add_argument("--random-weights", action="store_true",
                         help="untrained, seeded weights: for trying the pipeline only (predictions mean nothing)")
    m.add_argument("--num-classes", type=int, help="classes of the head (LookWhere: required)")
    m.add_argument("--input-size", type=int, help="Dyn-Perceiver input size (default 224)")
    m.add_argument("--high-res-size", type=int, help="LookWhere input size, a multiple of 14 (default 518)")
    m.add_argument("--task", choices=("cls", "seg"), help="LookWhere task (seg saves one mask PNG per image)")
    m.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="another constructor argument (VALUE read as JSON when it parses, else a string); repeatable")
    from ..models.spec import add_dtype_argument

    add_dtype_argument(m, "written")
    r = p.add_argument_group("what runs")
    r.add_argument("--thresholds", type=float, nargs="+", metavar="T",
                   help="Dyn-Perceiver early exit: max-softmax thresholds of exits 1-3 (e.g. from "
                        "lookfast.calibrate_thresholds); default: no early exit")
    ks = r.add_mutually_exclusive_group()
    ks.add_argument("--k", type=int, help="LookWhere: patches per image (default: the model's k, 136)")
    ks.add_argument("--k-mass", type=float, help="LookWhere: per image, the fewest patches holding this share of "
                                                 "the selector's score mass, in (0, 1]")
    r.add_argument("--k-min", type=int, default=1, help="--k-mass lower clamp (default 1)")
    r.add_argument("--k-max", type=int, help="--k-mass upper clamp (default: every patch)")
    r.add_argument("--batch", type=int, default=32, help="images per model call (default 32)")
    r.add_argument("--threads", type=int, help="torch threads (with --ray: per actor; default CPUs // actors)")
    io = p.add_argument_group("input and output")
    io.add_argument("--input", required=True, metavar="DIR|GLOB", help="a folder (images found recursively) or a "
                                                                       "glob pattern (quote it; ** recurses)")
    io.add_argument("--output", required=True, metavar="PATH",
                    help="*.jsonl (one file) or *.parquet (a folder of part files)")
    io.add_argument("--resume", action="store_true", help="continue an existing output, skipping its paths")
    io.add_argument("--mask-dir", metavar="DIR", help="seg: where masks go (default: <output>_masks)")
    io.add_argument("--flush-rows", type=int, default=1024,
                    help="Parquet: rows per part file (an interruption loses at most these; default 1024)")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("distributed (pip install 'lookfast[ray]')")
    d.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: 'local' starts Ray on this machine, 'auto' or an address connects; "
                        "bare --ray uses ray.init()'s default")
    d.add_argument("--actors", type=int, default=1, help="with --ray: model replicas (default 1)")
    return p


def _model_options(args) -> dict:
    options = {}
    for item in args.model_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-option must be KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    for name in ("num_classes", "input_size", "high_res_size", "task"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def main(args) -> int:
    """Run `python -m lookfast infer` with the parsed `args`. Returns the exit status: 0 done, 2 bad arguments or
    inputs (one line on stderr, nothing written), 130 interrupted (the rows written so far are kept)."""
    from ..models.spec import ModelSpec
    from .predict import InferSettings
    from .run import run_inference

    try:
        spec = ModelSpec.parse(args.model, args.checkpoint, args.random_weights, _model_options(args),
                               dtype=args.dtype)
        mask_dir = args.mask_dir
        if spec.options.get("task") == "seg" and mask_dir is None:
            mask_dir = os.fspath(args.output).rstrip("/\\").rsplit(".", 1)[0] + "_masks"
        settings = InferSettings(spec, tuple(args.thresholds) if args.thresholds else None, args.k, args.k_mass,
                                 args.k_min, args.k_max, args.batch, mask_dir)
    except ValueError as exc:
        print(f"lookfast infer: error: {exc}", file=sys.stderr)
        return 2
    if args.random_weights:
        banner = "!" * 78
        print(f"{banner}\n!! --random-weights: the model is UNTRAINED; its predictions are meaningless.\n"
              f"!! Use it to try the pipeline only; pass --checkpoint PATH for real predictions.\n{banner}",
              file=sys.stderr)
    print(f"lookfast infer: {spec.describe()}", file=sys.stderr)
    try:
        run_inference(settings, args.input, args.output, resume=args.resume, threads=args.threads,
                      progress=not args.no_progress, flush_rows=args.flush_rows, ray_address=args.ray,
                      actors=args.actors)
    except (ValueError, FileExistsError) as exc:
        print(f"lookfast infer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lookfast infer: interrupted; the rows written so far are kept (rerun with --resume)", file=sys.stderr)
        return 130
    return 0
