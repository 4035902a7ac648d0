"""One worker's job: image paths in, prediction rows out. The single-process run and every Ray actor use this class,
so both write the same rows.

    worker = Worker(settings)                   # loads the model once
    decoded = worker.decode(paths)              # (3, S, S) tensors, or ImageDecodeError for unreadable files
    pending = worker.start(paths, decoded)      # submitted to the serving Engine (lookfast.serving)
    rows = worker.finish(pending)               # one row per path (see outputs.py), errors included
    worker.close()
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..images import ImageDecodeError, decode_image, transform_for
from ..models.spec import ModelSpec



@dataclass(frozen=True)
class InferSettings:
    """Everything a worker needs, picklable (it travels to Ray actors).

    model: what to load (its `dtype` is the model's precision; images are decoded in float32 and cast by the
    engine, logits converted back to float32 before the softmax, so rows have the same types in every dtype).
    thresholds: Dyn-Perceiver early exit, 3 or 4 max-softmax thresholds (None: the full model, every image takes
    exit index 3). k / k_mass / k_min / k_max: LookWhere's patches per image (a fixed k, or
    the score-mass rule; neither: the model's default k). batch: the engine's max_batch (images per stage batch).
    mask_dir / root: segmentation masks are saved as mask_dir / relpath(image, root) + ".png"."""

    model: ModelSpec
    thresholds: tuple[float, ...] | None = None
    k: int | None = None
    k_mass: float | None = None
    k_min: int = 1
    k_max: int | None = None
    batch: int = 32
    mask_dir: str | None = None
    root: str | None = None

    def __post_init__(self):
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be a positive int, got {self.batch!r}")
        lookwhere = self.model.family == "lookwhere"
        if self.thresholds is not None:
            if lookwhere:
                raise ValueError("thresholds are for early-exit models (dyn_perceiver); LookWhere takes k or k_mass")
            if len(self.thresholds) not in (3, 4):
                raise ValueError(f"thresholds must hold 3 or 4 numbers (one per exit; the last exit takes every "
                                 f"image left), got {len(self.thresholds)}")
        if not lookwhere and (self.k is not None or self.k_mass is not None):
            raise ValueError("k / k_mass are for LookWhere models; Dyn-Perceiver takes thresholds")
        if self.k is not None and self.k_mass is not None:
            raise ValueError("give either k or k_mass, not both")
        if self.k_mass is not None and not 0.0 < self.k_mass <= 1.0:
            raise ValueError(f"k_mass must be in (0, 1], got {self.k_mass}")
        if self.model.options.get("task", "cls") == "seg" and not self.mask_dir:
            raise ValueError("a segmentation model needs mask_dir (where the masks are saved)")


class Worker:
    """Loads `settings.model` once (or takes `model`, already loaded) and turns image paths into rows."""

    def __init__(self, settings: InferSettings, model: torch.nn.Module | None = None):
        self.settings = settings
        self.model = settings.model.load() if model is None else model.eval()
        self.transform = transform_for(self.model)
        self.multi_exit = settings.model.family == "dyn_perceiver"
        self.task = getattr(self.model, "task", "cls")
        thresholds = settings.thresholds
        if thresholds is not None and len(thresholds) == 3:
            thresholds = tuple(thresholds) + (0.0,)  # the last exit takes every image still running
        self.thresholds = thresholds
        # Every image goes through the serving Engine (stage-level continuous batching for early exit, token-budget
        # packing for ragged k), so a static batch's tail of survivors does not waste the cores. It is thread-safe:
        # Ray actors run two calls at once. Offline, throughput is what counts: a partial batch may wait up to 50 ms
        # for the next images (the engine runs it at once when nothing more is queued upstream).
        from ..serving import Engine

        s = settings
        self.engine = Engine(self.model, max_batch=s.batch, thresholds=self.thresholds, k=s.k, k_mass=s.k_mass,
                             k_min=s.k_min, k_max=s.k_max, max_wait_ms=50.0)

    # -- decoding
    def decode(self, paths) -> list:
        """Each path -> a (3, S, S) float32 tensor, or the ImageDecodeError that reading it raised."""
        out = []
        for path in paths:
            try:
                out.append(decode_image(path, self.transform))
            except ImageDecodeError as exc:
                out.append(exc)
        return out

    def start(self, paths, decoded) -> list:
        """Submit the decoded images of `paths` to the engine; returns the pending rows for `finish`. Several
        starts may be pending at once (that keeps every stage's batches full)."""
        return [(path, self.engine.submit(d) if isinstance(d, torch.Tensor) else d) for path, d in zip(paths, decoded)]

    def finish(self, pending) -> list[dict]:
        """Wait for the images of one `start` and return their rows (see outputs.py for the columns)."""
        rows = []
        for path, item in pending:
            row = _empty_row(path)
            if isinstance(item, BaseException):
                row["error"] = _error_text(item)
            else:
                error = item.exception()
                if error is not None:
                    row["error"] = _error_text(error)
                else:
                    try:
                        self._fill(row, item.result())
                    except Exception as exc:  # noqa: BLE001 - e.g. the mask folder is not writable
                        row = _empty_row(path)
                        row["error"] = _error_text(exc)
            rows.append(row)
        return rows

    def predict(self, paths, decoded) -> list[dict]:
        """Rows for `paths` given their `decode` results."""
        return self.finish(self.start(paths, decoded))

    def __call__(self, paths) -> list[dict]:
        """Decode and predict `paths` (a list of str): one row per path, in order; a failure fills that row's error."""
        return self.predict(paths, self.decode(paths))

    def close(self) -> None:
        """Stop the engine's worker thread (after the images submitted)."""
        self.engine.close()

    def _fill(self, row: dict, pred) -> None:
        row["exit_index"] = pred.exit_index if self.multi_exit else None
        row["k"] = pred.k if not self.multi_exit else None
        logits = pred.logits.float()  # bf16/fp16 models: softmax / argmax in float32, rows typed as in float32
        if self.task == "seg":
            row["mask"] = self._save_mask(row["path"], logits.argmax(0))
            return
        probs = torch.softmax(logits, 0)
        top = torch.topk(probs, min(5, probs.numel()))
        row["top5"] = [[int(c), float(p)] for c, p in zip(top.indices.tolist(), top.values.tolist())]

    def _save_mask(self, path: str, classes: torch.Tensor) -> str:
        from ..images import _pil

        Image = _pil()
        s = self.settings
        rel = os.path.relpath(path, s.root) if s.root else os.path.basename(path)
        if rel.startswith(os.pardir):
            rel = os.path.basename(path)
        target = os.path.join(s.mask_dir, rel + ".png")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        array = classes.to(torch.int32).numpy()
        image = (Image.fromarray(array.astype("uint8"), mode="L") if array.max(initial=0) < 256
                 else Image.fromarray(array.astype("uint16")))
        tmp = target + ".tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, target)
        return target


def _empty_row(path: str) -> dict:
    return {"path": path, "top5": None, "exit_index": None, "k": None, "mask": None, "error": None}


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
