"""Decode PNG/JPEG images into model inputs with each model's official evaluation transform.

    from lookfast.images import decode_image, transform_for
    t = transform_for(model)                       # EvalTransform of a DynPerceiver or LookWhere model
    x = decode_image("cat.jpg", t)                 # (3, t.crop, t.crop) float32; also bytes or a pathlib.Path
    batch = torch.stack([decode_image(p, t) for p in paths])

The transforms, as the authors evaluate (read from their code):
- Dyn-Perceiver (LeapLabTHU/Dynamic_Perceiver, datasets.py `build_transform(is_train=False)` with the defaults of
  main_earlyExit.py: input_size 224, crop_pct None -> 224/256, imagenet_default_mean_and_std True): resize the
  shorter side to int(224 / 0.875) = 256 (bicubic), centre crop 224, to [0, 1], normalise with the ImageNet
  mean/std. At input_size >= 384 the official code warps to a square instead (no crop); so does this module.
- LookWhere (antofuller/lookwhere README): resize the shorter side to high_res_size (bicubic), to [0, 1], normalise
  with the ImageNet mean/std. The official transform has no crop because its example images are square, while the
  model only accepts high_res_size x high_res_size inputs; here a non-square image is centre cropped to that square
  after the resize (a square image is unchanged by the crop).

Each step is computed as torchvision's PIL path computes it (Pillow's bicubic `Image.resize` to the size torchvision
derives, the centre-crop offsets rounded with Python's round, uint8 / 255, then (x - mean) / std in float32), so the
tensors equal the official pipeline's without needing torchvision. Images are converted to RGB first, as
torchvision's ImageFolder loader does (alpha dropped, greyscale and palette images expanded); EXIF orientation is not
applied (the official loader does not either).

Pillow is imported on first use (`pip install lookfast[infer]`). Every failure to read or decode an image raises
`ImageDecodeError` (a ValueError) naming the image.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["ImageDecodeError", "EvalTransform", "dyn_perceiver_transform", "lookwhere_transform", "transform_for",
           "decode_image", "load_rgb", "apply_transform"]


class ImageDecodeError(ValueError):
    """An image could not be read or decoded (missing file, not an image, truncated or corrupt data, too large)."""


@dataclass(frozen=True)
class EvalTransform:
    """resize: the shorter side is resized to this many pixels (bicubic), or with `warp` both sides are;
    crop: the side of the centre square kept afterwards (the model's input size); mean/std: per-channel
    normalisation of the [0, 1] RGB values."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    warp: bool = False

    def __post_init__(self):
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalTransform {name} must be a positive int, got {value!r}")
        if self.warp and self.resize != self.crop:
            raise ValueError(f"a warping EvalTransform resizes straight to the crop size; got resize {self.resize} "
                             f"and crop {self.crop}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"EvalTransform {name} must have 3 values (R, G, B), got {value!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"EvalTransform std must be positive, got {self.std!r}")


def dyn_perceiver_transform(input_size: int = 224, crop_pct: float = 224 / 256) -> EvalTransform:
    """The official Dyn-Perceiver evaluation transform at `input_size` (224 for every released checkpoint):
    shorter side to int(input_size / crop_pct), centre crop input_size; at input_size >= 384 a warp to
    input_size x input_size instead, as the official build_transform does."""
    if input_size >= 384:
        return EvalTransform(resize=input_size, crop=input_size, warp=True)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return EvalTransform(resize=int(input_size / crop_pct), crop=input_size)


def lookwhere_transform(high_res_size: int) -> EvalTransform:
    """The official LookWhere evaluation transform: shorter side to high_res_size (then a centre square of that
    size, which only changes non-square images; see the module docstring)."""
    return EvalTransform(resize=high_res_size, crop=high_res_size)


def transform_for(model) -> EvalTransform:
    """The evaluation transform of a lookfast model: a DynPerceiver (at its input_size) or a LookWhere (at its
    config.high_res_size). Raises TypeError for anything else."""
    from .models.dyn_perceiver import DynPerceiver
    from .models.lookwhere import LookWhere

    if isinstance(model, DynPerceiver):
        return dyn_perceiver_transform(model.input_size)
    if isinstance(model, LookWhere):
        return lookwhere_transform(model.config.high_res_size)
    raise TypeError(f"transform_for needs a DynPerceiver or LookWhere model, got {type(model).__name__}")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # the optional extra is missing
        raise ImportError("decoding images needs Pillow: pip install 'lookfast[infer]' (or pip install pillow)") from exc
    return Image


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return repr(os.fspath(source))


def load_rgb(source):
    """Open `source` (bytes, bytearray, memoryview, str or os.PathLike path) and return a fully decoded RGB
    PIL.Image. Raises TypeError for another type and ImageDecodeError when the image cannot be read."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream, opened = io.BytesIO(bytes(source)), None
    elif isinstance(source, (str, os.PathLike)):
        stream, opened = None, os.fspath(source)
    else:
        raise TypeError(f"image source must be bytes or a path (str / os.PathLike), got {type(source).__name__}")
    Image = _pil()
    try:
        with Image.open(stream if stream is not None else opened) as image:
            image.load()  # Image.open is lazy: truncated or corrupt pixel data only fails here
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        # OSError: missing/unreadable file, unidentified format, truncated data; ValueError/SyntaxError/EOFError:
        # malformed headers some plugins report that way.
        raise ImageDecodeError(f"cannot decode image {_describe(source)}: {type(exc).__name__}: {exc}") from exc


def apply_transform(image, transform: EvalTransform) -> torch.Tensor:
    """An RGB PIL.Image -> (3, crop, crop) float32 tensor through `transform` (resize, centre crop, normalise)."""
    Image = _pil()
    if not isinstance(transform, EvalTransform):
        raise TypeError(f"transform must be an EvalTransform, got {type(transform).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"image must be an RGB PIL.Image (see load_rgb), got mode {image.mode!r}")
    w, h = image.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"image has no pixels ({w}x{h})")
    if transform.warp:
        size = (transform.resize, transform.resize)
    elif w <= h:  # torchvision: the shorter side becomes `resize`, the longer one int(resize * long / short)
        size = (transform.resize, int(transform.resize * h / w))
    else:
        size = (int(transform.resize * w / h), transform.resize)
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size[1], size[0], 3)
    pixels = _center_crop(pixels, transform.crop)
    x = pixels.permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(transform.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(transform.std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def _center_crop(pixels: torch.Tensor, crop: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (crop, crop, 3): torchvision's offsets (round((H - crop) / 2)), zero padding where the
    image is smaller than the crop (only reachable with a resize smaller than the crop)."""
    h, w = pixels.shape[:2]
    if h < crop or w < crop:
        top, left = (crop - h) // 2 if h < crop else 0, (crop - w) // 2 if w < crop else 0
        padded = pixels.new_zeros(max(h, crop), max(w, crop), 3)
        padded[top:top + h, left:left + w] = pixels
        pixels, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return pixels[top:top + crop, left:left + crop]


def decode_image(source, transform: EvalTransform) -> torch.Tensor:
    """Read and decode a PNG/JPEG (or any format Pillow reads) from bytes or a path and apply `transform`.
    Returns a contiguous (3, transform.crop, transform.crop) float32 tensor. Raises ImageDecodeError (a ValueError)
    naming the source when it cannot be read or decoded, TypeError for a source that is neither bytes nor a path."""
    image = load_rgb(source)
    try:
        return apply_transform(image, transform)
    except ImageDecodeError:
        raise
    except (OSError, ValueError) as exc:  # e.g. a decoder failing only during resize
        raise ImageDecodeError(f"cannot decode image {_describe(source)}: {type(exc).__name__}: {exc}") from exc
