"""Images/s of `python -m lookfast infer` in one process against `--ray local` with 1 and 2 actors, and the scaling
efficiency per added core. Not part of `python -m lookfast bench` (each Ray run starts a Ray and its actors, which
takes tens of seconds); run it on its own:

    python -m lookfast.benchmarks.infer_scaling [--images 128] [--model dyn_perceiver:reg800m_perceiver_t128]
        [--size 256] [--batch 32] [--json out.json]

It writes `--images` random JPEGs (`--size` px squares) to a temporary folder and runs the model with random weights
(throughput does not depend on the weights; no early exit unless --thresholds), each configuration in its own
subprocess, one after the other:

    single-1t   one process, 1 torch thread          ray-1x1   1 actor  x 1 thread
    single-Nt   one process, all CPUs' threads       ray-1xN   1 actor  x all CPUs
                                                     ray-Nx1   N actors x 1 thread (N = CPUs)

Reported per run: images/s over the whole command (start-up included) and after the first rows (steady state:
Ray, the actors and the model loaded). Scaling efficiency per added core = steady rate with N cores / (N x the steady
rate with 1 core), for threads in one process and for actors. On a shared machine only ratios from one invocation
mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _write_images(folder: str, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(os.path.join(folder, f"{i:05d}.jpg"),
                                                                         quality=90)


_RUN = """
import json, sys
from lookfast.infer import InferSettings, run_inference
from lookfast.models.spec import ModelSpec
a = json.loads(sys.argv[1])
spec = ModelSpec.parse(a["model"], random_weights=True)
settings = InferSettings(spec, thresholds=tuple(a["thresholds"]) if a["thresholds"] else None, batch=a["batch"])
s = run_inference(settings, a["input"], a["output"], threads=a["threads"], progress=False,
                  ray_address=a["ray"], actors=a["actors"])
print("RESULT " + json.dumps(s))
"""


def _run(name, args, folder, work, threads, ray, actors):
    out = os.path.join(work, f"{name}.jsonl")
    payload = json.dumps(dict(model=args.model, thresholds=args.thresholds, batch=args.batch, input=folder,
                              output=out, threads=threads, ray=ray, actors=actors))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN, payload], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    s = json.loads(line[len("RESULT "):])
    s.update(name=name, process_wall_s=wall, threads=threads, actors=actors if ray else None)
    print(f"{name:10s} {s['images']} images: {s['images_per_s']:.2f} images/s over the run "
          f"({s['seconds']:.1f} s), {s['steady_images_per_s'] or float('nan'):.2f} images/s after the first rows; "
          f"process {wall:.1f} s", flush=True)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lookfast.benchmarks.infer_scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--size", type=int, default=256, help="side of the generated JPEGs (px)")
    p.add_argument("--model", default="dyn_perceiver:reg800m_perceiver_t128")
    p.add_argument("--thresholds", type=float, nargs="+")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--only", nargs="+", help="run only these configurations (names above)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    from lookfast.integrations.ray import local_cpus

    cpus = local_cpus()
    configs = [("single-1t", 1, None, 1), (f"single-{cpus}t", cpus, None, 1), ("ray-1x1", 1, "local", 1),
               (f"ray-1x{cpus}", cpus, "local", 1), (f"ray-{cpus}x1", 1, "local", cpus)]
    if args.only:
        configs = [c for c in configs if c[0] in args.only]
    results = {}
    with tempfile.TemporaryDirectory(prefix="lookfast-infer-bench-") as work:
        folder = os.path.join(work, "images")
        os.makedirs(folder)
        _write_images(folder, args.images, args.size)
        print(f"{args.images} JPEGs of {args.size} px, {args.model} (random weights), batch {args.batch}, "
              f"{cpus} CPUs", flush=True)
        for name, threads, ray, actors in configs:
            results[name] = _run(name, args, folder, work, threads, ray, actors)
    rate = {n: r["steady_images_per_s"] for n, r in results.items()}
    notes = []
    if rate.get("single-1t") and rate.get(f"single-{cpus}t"):
        notes.append(f"threads in one process: {rate[f'single-{cpus}t'] / (cpus * rate['single-1t']):.2f} "
                     f"scaling efficiency per added core ({cpus} cores)")
    if rate.get("ray-1x1") and rate.get(f"ray-{cpus}x1"):
        notes.append(f"Ray actors: {rate[f'ray-{cpus}x1'] / (cpus * rate['ray-1x1']):.2f} scaling efficiency per "
                     f"added core ({cpus} actors x 1 thread against 1 x 1)")
    if rate.get(f"single-{cpus}t") and rate.get(f"ray-{cpus}x1"):
        notes.append(f"Ray {cpus} actors against one process with {cpus} threads: "
                     f"{rate[f'ray-{cpus}x1'] / rate[f'single-{cpus}t']:.2f}x (steady state)")
    for note in notes:
        print(note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "notes": notes, "args": vars(args), "cpus": cpus}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
