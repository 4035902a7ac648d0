"""`Engine`: serves a model under a stream of single-image requests with stage-level continuous batching.

One queue per stage of the model's pipeline (pipelines.py). A single worker thread repeatedly picks a stage and runs
it on up to a batch of waiting rows; rows that finish resolve their futures at once, the others join the next
stage's queue; new requests join the first stage's queue. So under load every stage runs near full batches,
whatever the exit rates, instead of a static batch's last stages running on a handful of survivors.

Scheduling rule (each step, under the engine's lock):
  1. a stage with a full batch waiting runs; when several have one, the deepest (it finishes the oldest requests
     and frees their memory first);
  2. otherwise a stage whose oldest row has waited `max_wait_ms` in its queue, or a later stage with nothing
     upstream of it (waiting cannot fill it), or any stage while the engine drains, runs: among those, the one
     holding the oldest request;
  3. otherwise the worker sleeps until the next deadline or the next request.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterable

import torch

from ..models.checkpoint_io import finite_per_image
from .pipelines import StepResult, build_pipeline


@dataclass
class Prediction:
    """One image's result.

    logits: (C,) for classifiers, (C, G, G) for LookWhere's "seg" task; the logits of the exit the image took.
    exit_index: the exit taken (0-based; single-exit models and LookWhere: the last stage's index).
    k: LookWhere's number of kept patches for this image; None for other models.
    latency_s: seconds from `submit` to the result.
    """

    logits: torch.Tensor
    exit_index: int
    k: int | None
    latency_s: float


class _Request:
    __slots__ = ("future", "t_submit")

    def __init__(self, future: Future, t_submit: float):
        self.future, self.t_submit = future, t_submit


class _Chunk:
    """Consecutive rows waiting in one stage's queue: their state (tensors with the rows first), their requests,
    their batch units, and when they joined the queue."""

    __slots__ = ("state", "reqs", "weights", "t_enq")

    def __init__(self, state: tuple, reqs: list, weights: list[int], t_enq: float):
        self.state, self.reqs, self.weights, self.t_enq = state, reqs, weights, t_enq

    def split(self, m: int) -> tuple["_Chunk", "_Chunk"]:
        """The first m rows and the rest (views, no copy)."""
        head = tuple(t[:m] if isinstance(t, torch.Tensor) else t for t in self.state)
        tail = tuple(t[m:] if isinstance(t, torch.Tensor) else t for t in self.state)
        return (_Chunk(head, self.reqs[:m], self.weights[:m], self.t_enq),
                _Chunk(tail, self.reqs[m:], self.weights[m:], self.t_enq))


def _merge(chunks: list[_Chunk]) -> tuple[tuple, list]:
    if len(chunks) == 1:
        return chunks[0].state, chunks[0].reqs
    state = tuple(torch.cat([c.state[j] for c in chunks]) if isinstance(t, torch.Tensor) else t
                  for j, t in enumerate(chunks[0].state))
    return state, [r for c in chunks for r in c.reqs]


def _rows(state: tuple, rows: list[int]) -> tuple:
    if len(rows) == 1:
        i = rows[0]
        return tuple(t[i:i + 1] if isinstance(t, torch.Tensor) else t for t in state)
    index = torch.tensor(rows, dtype=torch.int64)
    return tuple(t.index_select(0, index.to(t.device)) if isinstance(t, torch.Tensor) else t for t in state)


def _resolve(future: Future, value=None, error: BaseException | None = None) -> bool:
    if future.done():  # cancelled by the caller
        return False
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
        return True
    except Exception:  # noqa: BLE001  (InvalidStateError when cancelled concurrently)
        return False


class Engine:
    """Serve `model` to single-image requests with stage-level continuous batching (see the module docstring).

    Args:
        model: a Dyn-Perceiver (`lookfast.models.dyn_perceiver`), a LookWhere (`lookfast.models.lookwhere`), an
            `EarlyExitRunner` (any multi-exit model described as stages and heads), or a callable
            images (B, 3, H, W) -> logits (B, C) (one stage, no early exit). Eval mode is the caller's business.
        max_batch: most images per stage batch (LookWhere's selector stage; every stage of a multi-exit model).
        thresholds: multi-exit models: one threshold per exit (the last ignored), as `EarlyExitRunner` takes them;
            None: no early exit (every image takes the last exit).
        k, k_mass, k_min, k_max: LookWhere: a fixed k (int) for every image, or the per-image score-mass rule (see
            `LookWhere.forward`); neither: the model's k. Refused for other models.
        max_wait_ms: how long a partial batch waits for more rows before it runs anyway.
        max_tokens: LookWhere: token budget of one extractor pack (sum over images of prefix + k); default
            max_batch x (prefix + k), with k the fixed k, else k_max, else the model's k.
        criterion: multi-exit models: "max_softmax" (default), "entropy" or "margin".
        image_shape: (3, H, W) every request must have; default the model's input size (Dyn-Perceiver: 224,
            LookWhere: high_res_size), otherwise the shape of the first request.

    `submit(image)` returns a `concurrent.futures.Future` of a `Prediction`; it is safe from any thread. A request
    with a bad image (not a float tensor, wrong shape, NaN or infinite values) gets a future failed with a
    ValueError/TypeError; a request whose computation raises fails alone (its batch is re-run row by row), and
    the others go on. Close the engine (`close()` or a `with` block): its worker thread keeps it alive otherwise.
    Per image, the prediction equals running that image alone
    (`model.forward_early_exit(image[None], thresholds)`, `model(image[None], k_mass=...)`) up to float rounding,
    with the same exit index. `close()` finishes every submitted request, then stops the worker.
    """

    def __init__(self, model, max_batch: int = 32, thresholds=None, k: int | None = None,
                 k_mass: float | None = None, k_min: int = 1, k_max: int | None = None, max_wait_ms: float = 2.0,
                 *, max_tokens: int | None = None, criterion: str | None = None,
                 image_shape: tuple[int, int, int] | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or isinstance(max_wait_ms, bool) or not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise TypeError(f"max_tokens must be an int, got {type(max_tokens).__name__}")
        self.pipeline, default_shape = build_pipeline(model, thresholds, k, k_mass, k_min, k_max, max_batch,
                                                      max_tokens, criterion)
        if image_shape is not None:
            image_shape = tuple(int(s) for s in image_shape)
            if len(image_shape) != 3 or image_shape[0] != 3 or min(image_shape) < 1:
                raise ValueError(f"image_shape must be (3, H, W), got {image_shape}")
        self.image_shape = image_shape or default_shape
        self.model, self.max_batch, self.max_wait_s = model, max_batch, max_wait_ms / 1000.0
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
        n = self.pipeline.num_stages
        self._queues: list[collections.deque[_Chunk]] = [collections.deque() for _ in range(n)]
        self._units = [0] * n
        self._cond = threading.Condition()
        self._closing = False
        self._in_flight = 0  # rows taken by the worker and not yet resolved or queued
        self._stats = dict(submitted=0, done=0, failed=0, batches=[0] * n, rows=[0] * n, units=[0] * n,
                           exits=[0] * n, busy_s=0.0)
        self._latencies: collections.deque[float] = collections.deque(maxlen=100_000)
        self._t_start = time.perf_counter()
        self._worker_error: BaseException | None = None
        self._worker = threading.Thread(target=self._loop, name="lookfast-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------------ public
    def submit(self, image) -> Future:
        """Queue one image (3, H, W) (float; moved to the model's device and dtype). Returns a Future of a
        `Prediction`. A bad image fails the returned future (ValueError/TypeError naming `image`); submitting to a
        closed engine raises RuntimeError."""
        return self._submit_all([image])[0]

    def _submit_all(self, images: list) -> list[Future]:
        # Checked outside the lock, queued under one lock hold: an offline run's images reach the first stage
        # together, so its batches are full from the start.
        t = time.perf_counter()
        checked = []
        for image in images:
            try:
                checked.append(self._check_image(image))
            except (TypeError, ValueError) as err:
                checked.append(err)
        futures: list[Future] = [Future() for _ in images]
        failed = []
        with self._cond:
            if self._closing:
                raise RuntimeError("submit on a closed Engine")
            for future, x in zip(futures, checked):
                self._stats["submitted"] += 1
                if isinstance(x, torch.Tensor):
                    if self.image_shape is None:
                        self.image_shape = tuple(x.shape[1:])
                    if tuple(x.shape[1:]) != self.image_shape:
                        x = ValueError(f"image must have shape {self.image_shape} (this engine's input), "
                                       f"got {tuple(x.shape[1:])}")
                if isinstance(x, Exception):
                    self._stats["failed"] += 1
                    failed.append((future, x))
                    continue
                self._queues[0].append(_Chunk((x,), [_Request(future, t)], [1], t))
                self._units[0] += 1
            self._cond.notify()
        for future, err in failed:
            _resolve(future, error=err)
        return futures

    def _submit_block(self, block: torch.Tensor) -> list[Future]:
        """run()'s path for a (B, 3, H, W) tensor: checked as a whole (one sum per image for NaN/inf) and queued under
        one lock hold as chunks of up to `max_batch` consecutive good rows (views of `block`, no copy). So the first
        stage's batches need no torch.cat of single images (~0.4 ms per 224 px image on one core, ~2 % of
        Dyn-Perceiver's work per image). Everything is queued at once, as `_submit_all` does: queued group by group,
        a deep stage would find nothing upstream between two groups and run a partial batch. A block of the wrong
        dtype or shape goes the per-image way, which fails every image with the same error as `submit` would."""
        if (not block.dtype.is_floating_point or block.shape[1] != 3
                or (self.image_shape is not None and tuple(block.shape[1:]) != self.image_shape)):
            return self._submit_all(list(block))
        t = time.perf_counter()
        good = finite_per_image(block).tolist()
        x = block.to(device=self.device, dtype=self.dtype)
        futures: list[Future] = [Future() for _ in good]
        failed = []
        with self._cond:
            if self._closing:
                raise RuntimeError("submit on a closed Engine")
            if self.image_shape is None:
                self.image_shape = tuple(x.shape[1:])
            shape_error = None
            if tuple(x.shape[1:]) != self.image_shape:  # another thread's first request fixed another shape
                shape_error = ValueError(f"image must have shape {self.image_shape} (this engine's input), "
                                         f"got {tuple(x.shape[1:])}")
            self._stats["submitted"] += len(good)
            start = None
            for r, ok in enumerate(good + [False]):
                ok = ok and shape_error is None
                if ok and start is None:
                    start = r
                if start is not None and (not ok or r - start == self.max_batch):  # rows start..r-1: one chunk
                    reqs = [_Request(f, t) for f in futures[start:r]]
                    self._queues[0].append(_Chunk((x[start:r],), reqs, [1] * (r - start), t))
                    self._units[0] += r - start
                    start = r if ok else None
                if not ok and r < len(good):
                    self._stats["failed"] += 1
                    failed.append((futures[r], shape_error or ValueError("image has NaN or infinite values")))
            self._cond.notify()
        for future, err in failed:
            _resolve(future, error=err)
        return futures

    def run(self, images: Iterable, return_exceptions: bool = False) -> list:
        """Offline: submit every image of `images` (an iterable of (3, H, W), or a (B, 3, H, W) tensor) and return
        their Predictions in input order. A failed image raises its error, or with return_exceptions=True its
        exception object takes its place in the list."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            futures = self._submit_block(images)
        else:
            futures = self._submit_all(list(images))
        out = []
        for f in futures:
            err = f.exception()
            if err is not None and not return_exceptions:
                raise err
            out.append(err if err is not None else f.result())
        return out

    def stats(self) -> dict:
        """Counters since the engine started: images submitted / done / failed, per stage the batches run, rows
        run and mean batch size (rows; and units, LookWhere's tokens), images finished per exit, rows waiting per
        stage, rows in the batch running now, latency mean/p50/p99 (s), throughput (images/s of wall time) and the worker's busy fraction."""
        with self._cond:
            s = {k: (list(v) if isinstance(v, list) else v) for k, v in self._stats.items()}
            waiting = [sum(len(c.reqs) for c in q) for q in self._queues]
            running = self._in_flight
            lat = sorted(self._latencies)
        wall = time.perf_counter() - self._t_start
        mean = lambda a, b: [x / y if y else 0.0 for x, y in zip(a, b)]  # noqa: E731
        pct = lambda p: lat[min(len(lat) - 1, int(math.ceil(p * len(lat))) - 1)] if lat else None  # noqa: E731
        return dict(
            kind=self.pipeline.kind, images_submitted=s["submitted"], images_done=s["done"],
            images_failed=s["failed"], batches_per_stage=s["batches"], rows_per_stage=s["rows"],
            mean_batch_per_stage=mean(s["rows"], s["batches"]), mean_units_per_stage=mean(s["units"], s["batches"]),
            exits=s["exits"], waiting_per_stage=waiting, rows_running=running,
            latency_mean_s=sum(lat) / len(lat) if lat else None, latency_p50_s=pct(0.5), latency_p99_s=pct(0.99),
            throughput_per_s=s["done"] / wall if wall > 0 else 0.0, busy_fraction=s["busy_s"] / wall if wall else 0.0,
        )

    def close(self) -> None:
        """Stop taking requests, finish every submitted one (partial batches run without waiting), stop the worker.
        Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join()

    def stop_waiting(self) -> None:
        """From now on partial batches run at once (max_wait_ms becomes 0); submissions are still taken. A server
        calls this when it starts draining, so requests in flight do not wait for batches that will not fill."""
        with self._cond:
            self.max_wait_s = 0.0
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once close() has begun: submit refuses new work."""
        return self._closing

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ checks
    def _check_image(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be a torch.Tensor (3, H, W), got {type(image).__name__}")
        if not image.dtype.is_floating_point:
            raise TypeError(f"image must be a floating-point tensor (normalised pixels), got {image.dtype}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
        if self.image_shape is not None and tuple(image.shape) != self.image_shape:
            raise ValueError(f"image must have shape {self.image_shape} (this engine's input), got {tuple(image.shape)}")
        if not bool(finite_per_image(image.unsqueeze(0))[0]):  # a sum, not isfinite().all(): ~10x cheaper
            raise ValueError("image has NaN or infinite values")
        return image.to(device=self.device, dtype=self.dtype).unsqueeze(0)

    # ------------------------------------------------------------------------------------------------ worker
    def _pick(self, now: float) -> int | None:
        cap = self.pipeline.capacity
        queues, units = self._queues, self._units
        full = [i for i, q in enumerate(queues) if q and units[i] >= cap(i)]
        if full:
            return max(full)
        ready, upstream = [], False
        for i, q in enumerate(queues):
            if q and (self._closing or now - q[0].t_enq >= self.max_wait_s or (i > 0 and not upstream)):
                ready.append(i)
            upstream = upstream or bool(q)
        if not ready:
            return None
        # Oldest request first: the partial batch holding the request submitted earliest (a deeper stage's rows are
        # usually older). Choosing the fullest batch instead starved the deep stages' few rows under a steady
        # stream (S3: p99 latency 5x the median).
        return min(ready, key=lambda i: queues[i][0].reqs[0].t_submit)

    def _take(self, i: int) -> tuple[tuple, list]:
        cap, q = self.pipeline.capacity(i), self._queues[i]
        taken, used = [], 0
        while q:
            chunk = q[0]
            room, m = cap - used, 0
            for w in chunk.weights:
                if (used or m) and w > room:  # a batch always takes at least one row, however heavy
                    break
                room -= w
                m += 1
            if m == 0:
                break
            if m < len(chunk.weights):
                head, q[0] = chunk.split(m)
                chunk = head
            else:
                q.popleft()
            w = sum(chunk.weights)
            used += w
            self._units[i] -= w
            taken.append(chunk)
            if used >= cap:
                break
        return _merge(taken)

    def _loop(self) -> None:
        reqs: list = []
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while True:
                            now = time.perf_counter()
                            i = self._pick(now)
                            if i is not None:
                                state, reqs = self._take(i)
                                self._in_flight += len(reqs)
                                break
                            if self._closing and not any(self._queues):
                                return
                            waits = [q[0].t_enq + self.max_wait_s - now for q in self._queues if q]
                            self._cond.wait(max(min(waits), 1e-4) if waits else None)
                    t0 = time.perf_counter()
                    self._run_batch(i, state, reqs)
                    with self._cond:
                        self._stats["busy_s"] += time.perf_counter() - t0
                        self._in_flight -= len(reqs)
                    reqs = []
        except BaseException as err:  # noqa: BLE001  (a bug in the engine itself: fail everything, do not hang)
            self._worker_error = err
            with self._cond:
                self._closing = True
                pending = list(reqs) + [r for q in self._queues for c in q for r in c.reqs]
                for q in self._queues:
                    q.clear()
            for r in pending:
                _resolve(r.future, error=RuntimeError(f"lookfast Engine worker failed: {err!r}"))
            raise

    def _run_batch(self, i: int, state: tuple, reqs: list) -> None:
        n = len(reqs)
        try:
            result = self.pipeline.run(i, state, n)
        except Exception as err:  # noqa: BLE001
            if n == 1:
                with self._cond:
                    self._stats["failed"] += 1
                _resolve(reqs[0].future, error=err)
                return
            # Isolate the failure: every row alone, so only the request(s) that raise fail.
            for r in range(n):
                self._run_batch(i, _rows(state, [r]), [reqs[r]])
            return
        self._finish(i, result, state, reqs, n)

    def _finish(self, i: int, res: StepResult, state: tuple, reqs: list, n: int) -> None:
        now = time.perf_counter()
        done_reqs = [reqs[p] for p in res.done]
        preds = []
        for j, r in enumerate(done_reqs):
            k = res.k[res.done[j]] if res.k is not None else None
            preds.append((r, Prediction(res.logits[j].clone(), res.exit_index, k, now - r.t_submit)))
        with self._cond:
            st = self._stats
            st["batches"][i] += 1
            st["rows"][i] += n
            st["units"][i] += sum(self.pipeline.weights(i, state, n))
            st["exits"][res.exit_index] += len(preds)
            st["done"] += len(preds)
            self._latencies.extend(p.latency_s for _, p in preds)
            if res.state is not None:
                keep = range(n) if res.keep is None else res.keep
                go_on = [reqs[p] for p in keep]
                if go_on:
                    weights = self.pipeline.weights(i + 1, res.state, len(go_on))
                    self._queues[i + 1].append(_Chunk(res.state, go_on, weights, now))
                    self._units[i + 1] += sum(weights)
        for r, p in preds:
            _resolve(r.future, p)
