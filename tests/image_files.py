"""Generated test images, shared by tests/test_images.py, test_server.py, test_infer.py and test_infer_ray.py (the
`folder` fixture of conftest.py). Needs Pillow; the tests that use it skip without the extra first."""
from __future__ import annotations

import io
import os

import numpy as np

N_IMAGES = 64
CORRUPT = {"corrupt/empty.jpg": b"", "corrupt/text.png": b"not an image at all",
           "corrupt/truncated.jpg": None}  # None: the first half of a real JPEG


def random_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 white noise."""
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    """The file bytes of `array` (H, W, 3) uint8 in format `fmt`, converted to PIL `mode` first when given."""
    from PIL import Image

    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def image_bytes(seed: int, size: tuple[int, int] = (400, 300), fmt: str = "PNG") -> bytes:
    """A white-noise image of size (width, height) from `seed`, as file bytes."""
    return encode(random_rgb(np.random.default_rng(seed), size[1], size[0]), fmt)


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
