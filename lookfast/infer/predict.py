"""One worker's job: image paths in, prediction rows out. The single-process run and every Ray actor use this class,
so both write the same rows.

    worker = Worker(settings)                   # loads the model once
    decoded = worker.decode(paths)              # (3, S, S) tensors, or ImageDecodeError for unreadable files
    rows = worker.predict(paths, decoded)       # one row per path (see outputs.py), errors included
"""
from __future__ import annotations

import os
from collections import namedtuple
from dataclasses import dataclass

import torch

from ..images import ImageDecodeError, decode_image, transform_for
from ..models.spec import ModelSpec

# What the model call returns per image: logits (C,) or (C, G, G) for seg, exit_index (int or None), k (int or None).
Prediction = namedtuple("Prediction", ["logits", "exit_index", "k"])


@dataclass(frozen=True)
class InferSettings:
    """Everything a worker needs, picklable (it travels to Ray actors).

    model: what to load. thresholds: Dyn-Perceiver early exit, 3 or 4 max-softmax thresholds (None: the full
    model, every image takes exit index 3). k / k_mass / k_min / k_max: LookWhere's patches per image (a fixed k, or
    the score-mass rule; neither: the model's default k). batch: images per model call. mask_dir / root:
    segmentation masks are saved as mask_dir / relpath(image, root) + ".png"."""

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

    # -- the model call (the one place that runs the model)
    def run_model(self, images: list[torch.Tensor]) -> list[Prediction]:
        """A list of (3, S, S) images -> one Prediction each, in order. Per image the result is the one of running
        that image alone, up to float rounding (batched kernels round differently)."""
        x = torch.stack(images)
        s = self.settings
        with torch.no_grad():
            if self.multi_exit:
                if self.thresholds is None:
                    outs = self.model(x)  # every exit's logits: the full model takes the last
                    logits, exits = outs[-1], [len(outs) - 1] * len(images)
                else:
                    logits, exit_index = self.model.forward_early_exit(x, self.thresholds)
                    exits = exit_index.tolist()
                return [Prediction(logits[i], int(exits[i]), None) for i in range(len(images))]
            out = self.model.forward_with_intermediates(x, s.k, k_mass=s.k_mass, k_min=s.k_min, k_max=s.k_max)
            logits, k = out[f"{self.task}_logits"], out["k"]
            ks = k.tolist() if isinstance(k, torch.Tensor) else [int(k)] * len(images)
            return [Prediction(logits[i], None, int(ks[i])) for i in range(len(images))]

    def _run_isolated(self, images: list[torch.Tensor]) -> list:
        """run_model on the batch; if it raises, image by image, so one bad image fails only its own row."""
        try:
            return self.run_model(images)
        except Exception:  # noqa: BLE001 - the per-image pass below reports each image's own error
            out = []
            for image in images:
                try:
                    out.append(self.run_model([image])[0])
                except Exception as exc:  # noqa: BLE001
                    out.append(exc)
            return out

    # -- rows
    def predict(self, paths, decoded) -> list[dict]:
        """Rows for `paths` given their `decode` results (see outputs.py for the columns)."""
        rows = [_empty_row(p) for p in paths]
        good = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
        for i, d in enumerate(decoded):
            if not isinstance(d, torch.Tensor):
                rows[i]["error"] = _error_text(d)
        batch = self.settings.batch
        for start in range(0, len(good), batch):
            idx = good[start:start + batch]
            for i, pred in zip(idx, self._run_isolated([decoded[i] for i in idx])):
                if isinstance(pred, Exception):
                    rows[i]["error"] = _error_text(pred)
                    continue
                try:
                    self._fill(rows[i], pred)
                except Exception as exc:  # noqa: BLE001 - e.g. the mask folder is not writable
                    rows[i] = _empty_row(paths[i])
                    rows[i]["error"] = _error_text(exc)
        return rows

    def __call__(self, paths) -> list[dict]:
        return self.predict(paths, self.decode(paths))

    def _fill(self, row: dict, pred: Prediction) -> None:
        row["exit_index"] = pred.exit_index if self.multi_exit else None
        row["k"] = pred.k if not self.multi_exit else None
        logits = pred.logits.float()
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
