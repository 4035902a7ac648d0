"""Serving (issue 12): the `lookfast.serving.Engine` against static batching, and the runner at 0 % exits.

S1  Dyn-Perceiver reg800m_perceiver_t128, 224 px, 512 images (random weights, seed 0; standard-normal images),
    thresholds calibrated for about 50/25/12/12 % exits: the Engine (max_batch 32, stage-level continuous batching)
    against static batches of 32 through `forward_early_exit` and static batches of 32 of the full model (the
    official behaviour). Bars: >= 1.15x the former; engine time / full-model time <= 1.05 x the MACs ratio of the
    exits taken.
S2  LookWhere dinov2 518 px, 64 images, per-image k from `k_mass` (random weights whose selector head is scaled 20x
    so that the score mass gives a ragged, LookWhere-like spread of k, clamped to 16..300): the Engine (token-budget
    packs through varlen attention) against one image at a time and against padded batches of 32 at the batch's
    largest k. Bar: >= 1.3x both.
S3  an open-loop Poisson stream (bounded count; arrivals at 80 % of the engine's capacity measured in the case's
    setup) of S1's model and images: the Engine against static batching with a timeout (batches of up to 32, sent
    when full or 50 ms after their first request), and through the HTTP server (`python -m lookfast serve` in a
    subprocess on 127.0.0.1) with a local client. Time column: the wall time of one stream; the notes give p50/p99
    latency (arrival to answer) and the achieved throughput.
S4  the runner at 0 % early exits (`forward_early_exit` with thresholds no softmax reaches, the exit test still
    evaluated) against the plain model (which also computes all four exits' logits), reg800m B 32 (quick: B 8),
    alternating call by call. Bar: <= 1.03x the plain model's time.

Full-size rows are slow on a small CPU (S1 ~25 s per call, S2 ~35 s per call at 1 thread): they are in the full
suite only; `s1_case(n)`, `s2_case(n)`, `s3_case(n)` build the same rows at other sizes.
"""
from __future__ import annotations

import atexit
import http.client
import io
import math
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..case import Case

DP_NAME, DP_SIZE, BATCH = "reg800m_perceiver_t128", 224, 32
S1_EXITS = [0.5, 0.25, 0.125, 0.125]
LW_SIZE, LW_K_MASS, LW_K_MIN, LW_K_MAX, LW_SHARPEN = 518, 0.95, 16, 300, 20.0
S3_LOAD, S3_TIMEOUT_MS, S3_SEED = 0.8, 50.0, 3

ENGINE = "lookfast Engine (continuous batching)"
STATIC_EE = "static B32 forward_early_exit"
STATIC_FULL = "static B32 full model (official)"


# ------------------------------------------------------------------------------------------------ shared setup
def _dp_model():
    from lookfast.models.spec import ModelSpec

    # The spec S3's server builds from `--random-weights --seed 0`: the same weights, by the same code.
    return ModelSpec("dyn_perceiver", DP_NAME, random_weights=True, seed=0, options={"ops": "fused"}).load()


def _png_images(n: int, seed: int) -> list[bytes]:
    """n random RGB images (320 x 256) as PNG bytes, for S3's HTTP client; decoded they are S1/S3's inputs."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pixels = torch.randint(0, 256, (256, 320, 3), dtype=torch.uint8, generator=g).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _dp_images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, DP_SIZE, DP_SIZE, generator=torch.Generator().manual_seed(seed))


def _calibrated(model, images: torch.Tensor, proportions) -> list[float]:
    """Thresholds giving `proportions` on `images` (at most 128 of them), lowered 1e-4 relative: batched and
    single-image runs round confidences a few ulps apart, which must not move a sample across its threshold."""
    import lookfast

    with torch.no_grad():
        logits = torch.cat([torch.stack(model(c)) for c in images[:128].split(BATCH)], dim=1)
    thr = lookfast.calibrate_thresholds(logits, proportions)
    thr = torch.where(thr.isfinite(), thr * (1 - 1e-4), thr)
    return thr.tolist()


def _static(model, images: torch.Tensor, thresholds=None):
    def run():
        with torch.no_grad():
            for chunk in images.split(BATCH):
                if thresholds is None:
                    model(chunk)
                else:
                    model.forward_early_exit(chunk, thresholds)
    return run


def _recorded(box: dict, impls: dict, key: str, clock) -> dict:
    """`impls` with each call's `clock()` difference appended, in call order, to box[key][name]."""
    def wrap(name, fn):
        def run():
            start = clock()
            result = fn()
            box.setdefault(key, {}).setdefault(name, []).append(clock() - start)
            return result
        return run
    return {name: wrap(name, fn) for name, fn in impls.items()}


def _with_cpu_time(box: dict, impls: dict) -> dict:
    """Also record each call's process CPU time (all threads: the engine's worker included). On a shared,
    oversubscribed machine the wall time includes waiting for a core; the CPU time does not."""
    return _recorded(box, impls, "cpu", time.process_time)


def _cpu_notes(box: dict, ours: str, label: str = "the engine") -> list[str]:
    cpu = {k: statistics.median(v) for k, v in box.get("cpu", {}).items() if v}
    if ours not in cpu:
        return []
    return ["CPU time (median, s): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            + f"; ratios to {label}: " + ", ".join(f"{k} {v / cpu[ours]:.2f}x" for k, v in cpu.items() if k != ours)]


# ------------------------------------------------------------------------------------------------ S1
def s1_case(n_images: int = 512) -> Case:
    box: dict = {}
    bars: dict[str, float] = {}

    def setup():
        import lookfast
        from lookfast.serving import Engine

        model = _dp_model()
        images = _dp_images(n_images, 1)
        thresholds = _calibrated(model, images, S1_EXITS)
        macs = model.exit_macs()

        def engine():
            with Engine(model, max_batch=BATCH, thresholds=thresholds) as e:
                preds = e.run(images)
                box["stats"] = e.stats()
            if "taken" not in box:  # the first (warm-up) call fixes the bars: the exits taken and their MACs
                exits = torch.tensor([p.exit_index for p in preds])
                taken = torch.bincount(exits, minlength=4).double() / n_images
                box["taken"] = taken.tolist()
                box["macs_ratio"] = float(lookfast.expected_cost(taken, macs)) / macs[-1]
                bars[STATIC_EE] = 1.15
                bars[STATIC_FULL] = 1.0 / (1.05 * box["macs_ratio"])  # time ratio <= 1.05 x MACs ratio

        return _with_cpu_time(box, {ENGINE: engine, STATIC_EE: _static(model, images, thresholds),
                                    STATIC_FULL: _static(model, images)})

    def summarize(times):
        ours, full = times.get(ENGINE), times.get(STATIC_FULL)
        if not ours or not full or "macs_ratio" not in box:
            return []
        r, m = ours / full, box["macs_ratio"]
        batches = "/".join(f"{b:.1f}" for b in box["stats"]["mean_batch_per_stage"])
        return [f"exits taken {'/'.join(f'{100 * t:.0f}' for t in box['taken'])} %; engine mean batch per stage "
                f"{batches}",
                f"engine time / full-model time {r:.3f} vs MACs ratio {m:.3f} (bar <= {1.05 * m:.3f}, "
                f"{'met' if r <= 1.05 * m else 'NOT met'})"] + _cpu_notes(box, ENGINE)

    return Case(id="S1" if n_images == 512 else f"S1-n{n_images}", op="serving",
                shape=f"dyn_perceiver {DP_NAME} {n_images} images {DP_SIZE}px, exits ~50/25/12/12 %",
                setup=setup, bars=bars, quick=False, multi_thread=False, summarize=summarize, turns=2)


# ------------------------------------------------------------------------------------------------ S2
def _lw_model():
    from lookfast.models.lookwhere import LookWhere

    torch.manual_seed(0)
    model = LookWhere.from_config(high_res_size=LW_SIZE, k=136, num_classes=1000, ops="fused").eval()
    with torch.no_grad():  # sharper random scores: the score mass then gives a ragged k, as a trained selector does
        model.selector.head.w2.weight.mul_(LW_SHARPEN)
        model.selector.head.w2.bias.mul_(LW_SHARPEN)
    return model


def s2_case(n_images: int = 64) -> Case:
    box: dict = {}
    one, padded = "one image at a time", f"padded B{BATCH} at the batch's largest k"

    def setup():
        from lookfast.serving import Engine

        model = _lw_model()
        g = torch.Generator().manual_seed(5)
        # Per-image contrast varies so that the selector's score mass (and k) varies across images.
        images = torch.randn(n_images, 3, LW_SIZE, LW_SIZE, generator=g)
        images *= torch.empty(n_images, 1, 1, 1).uniform_(0.3, 3.0, generator=g)
        kw = dict(k_mass=LW_K_MASS, k_min=LW_K_MIN, k_max=LW_K_MAX)

        def engine():
            with Engine(model, max_batch=BATCH, **kw) as e:
                preds = e.run(images)
                box["stats"] = e.stats()
            box["k"] = [p.k for p in preds]

        def alone():
            with torch.inference_mode():
                for i in range(n_images):
                    model(images[i:i + 1], **kw)

        def pad():
            with torch.inference_mode():
                for chunk in images.split(BATCH):
                    (scores, prefix), k = model.select(chunk, **kw)
                    model.extract(chunk, scores, prefix, int(k.max()))  # every image at the batch's largest k

        return _with_cpu_time(box, {ENGINE: engine, one: alone, padded: pad})

    def summarize(times):
        if "k" not in box:
            return []
        k = box["k"]
        s = box["stats"]
        return [f"k per image {min(k)}..{max(k)} (mean {statistics.fmean(k):.0f}); engine: "
                f"{s['batches_per_stage'][1]} extractor packs of {s['mean_batch_per_stage'][1]:.1f} images / "
                f"{s['mean_units_per_stage'][1]:.0f} tokens on average"] + _cpu_notes(box, ENGINE)

    return Case(id="S2" if n_images == 64 else f"S2-n{n_images}", op="serving",
                shape=f"lookwhere dinov2 {LW_SIZE}px {n_images} images, k_mass {LW_K_MASS} (k {LW_K_MIN}..{LW_K_MAX})",
                setup=setup, bars={one: 1.3, padded: 1.3}, quick=False, multi_thread=False, summarize=summarize,
                turns=2)


# ------------------------------------------------------------------------------------------------ S3
def _percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]


def _arrivals(n: int, rate: float) -> list[float]:
    rng = random.Random(S3_SEED)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _open_loop(arrivals: list[float], send) -> list[float]:
    """Call send(i) -> Future at each arrival time (open loop: never waits for answers); latencies (s) from the
    scheduled arrival to each answer."""
    done = [0.0] * len(arrivals)
    finished = threading.Semaphore(0)
    errors: list[BaseException] = []

    def on_done(f, i):
        done[i] = time.perf_counter()
        if f.exception() is not None:
            errors.append(f.exception())
        finished.release()

    start = time.perf_counter()
    for i, t in enumerate(arrivals):
        delay = start + t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(i).add_done_callback(lambda f, i=i: on_done(f, i))
    for _ in arrivals:
        if not finished.acquire(timeout=600):
            raise TimeoutError("a request of the stream did not finish within 600 s")
    if errors:
        raise errors[0]
    return [done[i] - (start + t) for i, t in enumerate(arrivals)]


class _StaticBatcher:
    """Static batching with a timeout: a batch is sent when BATCH requests are waiting or S3_TIMEOUT_MS after its
    first request arrived, and runs `forward_early_exit` as a whole."""

    def __init__(self, model, thresholds):
        self.model, self.thresholds = model, thresholds
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, image) -> Future:
        f: Future = Future()
        self.q.put((image, f))
        return f

    def close(self):
        self.q.put(None)
        self.thread.join()

    def _loop(self):
        closing = False
        while not closing:
            first = self.q.get()
            if first is None:
                return
            batch, deadline = [first], time.perf_counter() + S3_TIMEOUT_MS / 1000
            while len(batch) < BATCH:
                try:
                    item = self.q.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            with torch.inference_mode():
                logits, _ = self.model.forward_early_exit(torch.stack([b[0] for b in batch]), self.thresholds)
            for (_, f), row in zip(batch, logits):
                f.set_result(row)


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "lookfastbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _flag_number(t: float) -> str:
    # argparse takes "-1.0" as a negative number but "-inf" (or "-1e308") as an unknown option.
    return repr(t) if math.isfinite(t) or t > 0 else "-1.0"  # max-softmax confidence >= -1: everybody passes


class _HttpServer:
    """`python -m lookfast serve` in a subprocess on a free 127.0.0.1 port (stopped with SIGTERM at exit)."""

    def __init__(self, thresholds, threads: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lookfast", "serve", "--model", f"dyn_perceiver:{DP_NAME}", "--random-weights",
             "--seed", "0", "--port", str(self.port), "--max-batch", str(BATCH), "--threads", str(threads),
             "--log-level", "warning", "--thresholds", *map(_flag_number, thresholds)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start within 300 s")

    def post(self, data: bytes) -> None:
        body, ctype = _multipart(data)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"the server answered {r.status}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def s3_case(n_requests: int = 256) -> Case:
    box: dict = {"lat": {}}
    http_name = "HTTP server (lookfast serve) + local client"
    static = f"static B{BATCH} batching, {S3_TIMEOUT_MS:.0f} ms timeout"

    def setup():
        from lookfast.images import decode_image, transform_for
        from lookfast.serving import Engine

        model = _dp_model()
        pngs = _png_images(min(n_requests, 128), 7)
        transform = transform_for(model)
        images = torch.stack([decode_image(p, transform) for p in pngs])
        thresholds = _calibrated(model, images, S1_EXITS)
        # Capacity: the engine's offline throughput on these images (twice, the first warms it).
        with Engine(model, max_batch=BATCH, thresholds=thresholds) as e:
            e.run(images)
            t0 = time.perf_counter()
            e.run(images)
            capacity = len(images) / (time.perf_counter() - t0)
        rate = S3_LOAD * capacity
        arrivals = _arrivals(n_requests, rate)
        box.update(capacity=capacity, rate=rate)
        pick = lambda i: images[i % len(images)]  # noqa: E731

        def engine():
            with Engine(model, max_batch=BATCH, thresholds=thresholds) as e:
                box["lat"].setdefault(ENGINE, []).append(_open_loop(arrivals, lambda i: e.submit(pick(i))))

        def batcher():
            b = _StaticBatcher(model, thresholds)
            try:
                box["lat"].setdefault(static, []).append(_open_loop(arrivals, lambda i: b.submit(pick(i))))
            finally:
                b.close()

        server = {}

        def over_http():
            if "s" not in server:
                server["s"] = _HttpServer(thresholds, torch.get_num_threads())
            s = server["s"]
            with ThreadPoolExecutor(max_workers=64) as pool:  # bounded: at most 64 connections at once
                box["lat"].setdefault(http_name, []).append(
                    _open_loop(arrivals, lambda i: pool.submit(s.post, pngs[i % len(pngs)])))

        return {ENGINE: engine, static: batcher, http_name: over_http}

    def summarize(times):
        if "rate" not in box:
            return []
        notes = [f"{n_requests} requests, Poisson arrivals at {box['rate']:.1f}/s = {S3_LOAD:.0%} of the engine's "
                 f"measured capacity {box['capacity']:.1f} images/s"]
        for name, runs in box["lat"].items():
            lat = [x for run in runs for x in run]
            wall = times.get(name)
            thr = f", throughput {n_requests / wall:.1f}/s" if wall else ""
            notes.append(f"{name}: p50 {1e3 * _percentile(lat, 0.5):.0f} ms, p99 {1e3 * _percentile(lat, 0.99):.0f} ms"
                         f"{thr} ({len(runs)} streams)")
        return notes

    return Case(id="S3" if n_requests == 256 else f"S3-n{n_requests}", op="serving",
                shape=f"dyn_perceiver {DP_NAME}, {n_requests} requests, Poisson at {S3_LOAD:.0%} of capacity",
                setup=setup, quick=False, multi_thread=False, summarize=summarize, turns=2)


# ------------------------------------------------------------------------------------------------ S4
S4_TURNS = {True: 15, False: 11}  # quick (B 8, ~0.3 s a call), full (B 32, ~1 s a call)


def s4_case(batch: int, quick: bool) -> Case:
    """Like with like: the same model object (float32, fused ops), the same images, both under no_grad, both computing
    all four exits' logits (the plain forward returns (y1, y2, y3, y4); the runner runs the same four pieces and
    heads). What the runner adds: threshold validation, the max-softmax confidence of exits 1-3 and the exit test
    (thresholds 2.0: computed, and no softmax reaches it; +inf would skip the test altogether), the output buffer
    and one scatter. The two alternate call by call (one call per turn, `S4_TURNS` turns), so load drift on a shared
    machine hits both alike; the notes add the runner's own time (a call minus the model pieces' time inside it), the
    median of the per-turn ratios, the ratio of the fastest calls and the CPU-time ratio."""
    runner, plain = "forward_early_exit, 0 % exits", "plain model (all four exits)"
    box: dict = {}

    def setup():
        model = _dp_model()
        x = _dp_images(batch, 1)
        never = [2.0, 2.0, 2.0, 0.0]  # unreachable (softmax <= 1) but evaluated: the exit test is part of the cost

        def early():
            return model.forward_early_exit(x, never)

        def full():
            with torch.no_grad():
                return model(x)

        _, idx = early()
        assert bool((idx == 3).all())
        box["own_ms"] = _runner_own_ms(model, early)
        return _with_samples(box, _with_cpu_time(box, {runner: early, plain: full}))

    def summarize(times):
        notes = _cpu_notes(box, runner, "the runner")
        if box.get("own_ms") and times.get(plain):
            own = statistics.median(box["own_ms"])
            notes.insert(0, f"the runner's own time (a call minus its four model pieces, median of "
                            f"{len(box['own_ms'])}): {own:.2f} ms = {100 * own / (1e3 * times[plain]):.2f} % of the "
                            "plain call")
        walls = box.get("walls", {})
        if walls.get(runner) and walls.get(plain):
            n = S4_TURNS[quick]  # the timed calls (one per turn) are the last n: the first calls warmed up
            pairs = [a / b for a, b in zip(walls[runner][-n:], walls[plain][-n:])]
            fastest = min(walls[runner][-n:]) / min(walls[plain][-n:])
            notes.insert(0, f"runner / plain, median of {len(pairs)} consecutive pairs: {statistics.median(pairs):.3f} "
                            f"(ratio of medians {times[runner] / times[plain]:.3f}, of the fastest calls "
                            f"{fastest:.3f})")
        return notes

    return Case(id=f"S4-b{batch}", op="serving", shape=f"dyn_perceiver {DP_NAME} B {batch} {DP_SIZE}px, 0 % exits",
                setup=setup, bars={plain: 1 / 1.03}, quick=quick, multi_thread=False, summarize=summarize,
                turns=S4_TURNS[quick])


def _runner_own_ms(model, early, calls: int = 5) -> list[float]:
    """ms per `early()` call spent outside the model's four pieces (forward_exit1..4, timed by wrappers put on the
    instance for these calls only): what the runner itself costs, independent of load drift between calls."""
    inside = [0.0]

    def timed(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                inside[0] += time.perf_counter() - start
        return run

    names = [f"forward_exit{i}" for i in range(1, 5)]
    own = []
    try:
        for name in names:
            setattr(model, name, timed(getattr(model, name)))
        for _ in range(calls):
            inside[0] = 0.0
            start = time.perf_counter()
            early()
            own.append(1e3 * (time.perf_counter() - start - inside[0]))
    finally:
        for name in names:
            model.__dict__.pop(name, None)
    return own


def _with_samples(box: dict, impls: dict) -> dict:
    """Also record each call's wall time, in call order (the k-th calls of two implementations alternating one call
    per turn are neighbours in time: their ratio is free of the load drift between turns)."""
    return _recorded(box, impls, "walls", time.perf_counter)


# ------------------------------------------------------------------------------------------------ S1-stages
STAGE_BATCHES = (32, 4, 8, 16, 64)


def s1_stages_case(n_images: int = 64) -> Case:
    """Why S1's bars are (not) reachable on a machine: Dyn-Perceiver's cost per image at each stage against the batch
    size. Each implementation runs `n_images` images through the four stages (`stages[i]` then `heads[i]` of
    `exit_stages.stages_and_heads`, nobody exiting) in batches of B, timing each stage. Notes: ms per image per stage
    (medians over calls), GMAC/s per stage, and from them (a) the engine's best case (every stage at B 32, no
    overhead) against static `forward_early_exit` batches of 32 (stages 2-4 at the survivors' batch sizes) for S1's
    exit rates, and (b) that best case's time ratio to the full model over the MACs ratio (S1's second bar)."""
    box: dict = {"ms": {}}

    def setup():
        from lookfast.models.dyn_perceiver.exit_stages import stages_and_heads

        model = _dp_model()
        stages, heads = stages_and_heads(model)
        images = _dp_images(n_images, 1)
        box["macs"] = model.exit_macs()

        def at(b):
            def run():
                per_stage = [0.0] * 4
                with torch.inference_mode():
                    for chunk in images.split(b):
                        state = (chunk,)
                        for i in range(4):
                            t = time.perf_counter()
                            state = stages[i](state)
                            state = state if isinstance(state, tuple) else (state,)
                            out = heads[i](state)
                            per_stage[i] += time.perf_counter() - t
                            state = out[1] if isinstance(out, tuple) else state
                box["ms"].setdefault(b, []).append([1e3 * t / n_images for t in per_stage])
            return run

        return {f"stages at B {b}": at(b) for b in STAGE_BATCHES}

    def summarize(times):
        if not box["ms"] or 32 not in box["ms"]:
            return []
        ms = {b: [statistics.median(c[i] for c in calls) for i in range(4)] for b, calls in box["ms"].items()}
        macs = box["macs"]
        share = [macs[0]] + [macs[i] - macs[i - 1] for i in range(1, 4)]
        gmacs = {b: [share[i] / 1e6 / ms[b][i] for i in range(4)] for b in ms}
        notes = [f"B {b:>2}: ms per image per stage " + " / ".join(f"{v:.2f}" for v in ms[b])
                 + f" (all {sum(ms[b]):.2f}); GMAC/s " + " / ".join(f"{g:.1f}" for g in gmacs[b]) for b in sorted(ms)]
        running = [1.0]  # fraction of images that run stage i
        for p in S1_EXITS[:-1]:
            running.append(running[-1] - p)
        best = sum(f * ms[32][i] for i, f in enumerate(running))
        static_batch = [max(1, round(BATCH * f)) for f in running]  # survivors of a batch of 32
        if all(b in ms for b in static_batch):
            static = sum(f * ms[b][i] for i, (f, b) in enumerate(zip(running, static_batch)))
            notes.append(f"exits {'/'.join(f'{100 * p:.1f}' for p in S1_EXITS)} %: engine best case {best:.2f} ms per "
                         f"image vs static B32 early exit {static:.2f} (stages at B "
                         f"{'/'.join(map(str, static_batch))}): {static / best:.3f}x (S1 bar 1.15x)")
        macs_ratio = sum(f * s_ for f, s_ in zip(running, share)) / macs[-1]
        time_ratio = best / sum(ms[32])
        notes.append(f"best-case time / full-model time {time_ratio:.3f} vs MACs ratio {macs_ratio:.3f}: "
                     f"{time_ratio / macs_ratio:.3f}x (S1 bar <= 1.05x)")
        return notes

    return Case(id="S1-stages", op="serving",
                shape=f"dyn_perceiver {DP_NAME} {n_images} images {DP_SIZE}px, per-stage cost vs batch size",
                setup=setup, quick=False, multi_thread=False, summarize=summarize)


def cases() -> list[Case]:
    return [s4_case(8, True), s4_case(BATCH, False), s1_case(), s1_stages_case(), s2_case(), s3_case()]
