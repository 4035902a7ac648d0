"""Shared by tests/test_infer.py and tests/test_infer_ray.py: a generated image folder and small random-weight models
(every process builds the same weights from the spec's seed)."""
from __future__ import annotations

import os

import numpy as np
import torch

from lookfast.images import decode_image, transform_for
from lookfast.models.spec import ModelSpec

N_IMAGES = 64
CORRUPT = {"corrupt/empty.jpg": b"", "corrupt/text.png": b"not an image at all",
           "corrupt/truncated.jpg": None}  # None: the first half of a real JPEG

DP_SPEC = ModelSpec("dyn_perceiver", "reg400m_perceiver_t32", random_weights=True, seed=0,
                    options={"num_classes": 10, "input_size": 64})
LW_SPEC = ModelSpec("lookwhere", "dinov2", random_weights=True, seed=0,
                    options={"lw_type": "dinov2", "high_res_size": 70, "k": 9, "num_classes": 7, "dim": 64,
                             "num_heads": 2, "selector_depth": 1, "extractor_depth": 2})


def make_folder(root) -> tuple[list[str], list[str]]:
    """64 images of assorted sizes (PNG and JPEG, some in a subfolder), 3 corrupt image files and a text file.
    Returns (good image paths, corrupt paths), absolute and sorted."""
    from PIL import Image

    rng = np.random.default_rng(1234)
    good = []
    for i in range(N_IMAGES):
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        # Smooth random colour fields (not white noise): pixels with structure, like photos, survive the resize.
        base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        noise = rng.integers(-20, 21, size=(h, w, 3))
        image = Image.fromarray(np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8))
        sub = "sub" if i % 4 == 0 else ""
        ext = "png" if i % 2 else "jpg"
        path = os.path.join(root, sub, f"img{i:03d}.{ext}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)
        good.append(os.path.abspath(path))
    jpeg = open(good[0], "rb").read()
    corrupt = []
    for rel, data in CORRUPT.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(jpeg[: len(jpeg) // 2] if data is None else data)
        corrupt.append(os.path.abspath(path))
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("not an image: left out of a folder input")
    return sorted(good), sorted(corrupt)


def decoded(model, paths) -> torch.Tensor:
    t = transform_for(model)
    return torch.stack([decode_image(p, t) for p in paths])


def split_thresholds(model, images, shares=(0.5, 0.5, 0.5)) -> tuple[float, float, float, float]:
    """Thresholds that make about `shares` of the images still running leave at exits 1-3, each placed halfway
    between two neighbouring confidences (so float rounding cannot move an image across it)."""
    with torch.no_grad():
        exits = model(images)
    conf = [torch.softmax(y.double(), -1).max(-1).values for y in exits]
    running = torch.ones(images.shape[0], dtype=torch.bool)
    thresholds = []
    for e, share in enumerate(shares):
        c = conf[e][running].sort(descending=True).values
        m = max(1, int(len(c) * share))
        t = float((c[m - 1] + c[m]) / 2) if m < len(c) else float(c[-1]) - 1e-3
        thresholds.append(t)
        running &= conf[e] < t
    return tuple(thresholds) + (0.0,)


def comparable(rows, tol=1e-5):
    """Rows keyed by path, probabilities rounded to `tol` (batched kernels round differently)."""
    out = {}
    for row in rows:
        r = dict(row)
        if r["top5"] is not None:
            r["top5"] = [[int(c), round(float(p) / tol) * tol] for c, p in r["top5"]]
        out[r["path"]] = r
    return out


def assert_same_rows(a, b, tol=2e-5):
    """Same paths (each once), same classes / exits / k / masks / errors, probabilities within tol."""
    paths_a, paths_b = [r["path"] for r in a], [r["path"] for r in b]
    assert len(paths_a) == len(set(paths_a)) and len(paths_b) == len(set(paths_b)), "duplicate rows"
    assert sorted(paths_a) == sorted(paths_b)
    by_b = {r["path"]: r for r in b}
    for ra in a:
        rb = by_b[ra["path"]]
        for key in ("exit_index", "k", "mask", "error"):
            assert ra[key] == rb[key], (ra["path"], key, ra[key], rb[key])
        if ra["top5"] is None:
            assert rb["top5"] is None
            continue
        assert [c for c, _ in ra["top5"]] == [c for c, _ in rb["top5"]], ra["path"]
        np.testing.assert_allclose([p for _, p in ra["top5"]], [p for _, p in rb["top5"]], rtol=0, atol=tol)
