"""lookfast.images: the official evaluation transforms on generated images, and clear errors for bad ones.

Expected values come from numpy in float64 on the generated pixels (crop offsets written out by hand), not from the
module under test."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL", reason="the images module needs Pillow (pip install 'lookfast[infer]')")
from PIL import Image  # noqa: E402

from lookfast import images  # noqa: E402
from lookfast.images import EvalTransform, ImageDecodeError, decode_image  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _random_rgb(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _encode(array, fmt="PNG", mode=None, **save):
    buf = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def _normalised(pixels_hwc):
    x = pixels_hwc.astype(np.float64) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def test_official_constants():
    # Dyn-Perceiver: crop_pct 224/256 -> resize 256, crop 224; LookWhere: resize = crop = high_res_size.
    t = images.dyn_perceiver_transform()
    assert (t.resize, t.crop, t.warp) == (256, 224, False)
    assert t.mean == (0.485, 0.456, 0.406) and t.std == (0.229, 0.224, 0.225)
    assert images.dyn_perceiver_transform(384) == EvalTransform(384, 384, warp=True)
    t = images.lookwhere_transform(518)
    assert (t.resize, t.crop, t.warp) == (518, 518, False)


@pytest.mark.parametrize("w, h, left, top", [
    (256, 256, 16, 16),      # no resize needed: shorter side is already 256
    (300, 256, 38, 16),      # (300 - 224) / 2 = 38
    (301, 256, 38, 16),      # 38.5 rounds half to even -> 38, as torchvision's round()
    (303, 256, 40, 16),      # 39.5 -> 40
    (256, 333, 16, 54),      # portrait: (333 - 224) / 2 = 54.5 -> 54
])
def test_crop_offsets_and_normalisation_exact(w, h, left, top):
    rng = np.random.default_rng([w, h, 7])
    pixels = _random_rgb(rng, h, w)
    x = decode_image(_encode(pixels), images.dyn_perceiver_transform())
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and x.is_contiguous()
    expected = _normalised(pixels[top:top + 224, left:left + 224])
    np.testing.assert_allclose(x.double().numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("w, h", [(500, 375), (375, 500), (64, 48), (1000, 1000), (257, 256)])
def test_resize_keeps_flat_colour_and_output_shape(w, h):
    # Bicubic interpolation of a constant image is that constant: the output is exactly the normalised colour.
    colour = np.array([200, 17, 90], dtype=np.uint8)
    pixels = np.broadcast_to(colour, (h, w, 3)).copy()
    for t in (images.dyn_perceiver_transform(), images.lookwhere_transform(182)):
        x = decode_image(_encode(pixels), t)
        assert x.shape == (3, t.crop, t.crop)
        expected = (colour / 255.0 - MEAN) / STD
        np.testing.assert_allclose(x.double().numpy(), np.broadcast_to(expected[:, None, None], x.shape), atol=2e-6)


def test_resize_of_a_smooth_ramp_matches_the_ramp():
    # A horizontal ramp 0..255 over 512 columns, resized to 256 columns and cropped: column j of the output sits at
    # source position (16 + j + 0.5) * 2 - 0.5; interpolation of a linear ramp stays on the ramp (up to uint8
    # rounding) away from the borders.
    w, h = 512, 512
    ramp = (np.arange(w) * 255.0 / (w - 1))
    pixels = np.broadcast_to(np.round(ramp).astype(np.uint8)[None, :, None], (h, w, 3)).copy()
    x = decode_image(_encode(pixels), images.dyn_perceiver_transform())
    source_col = (16 + np.arange(224) + 0.5) * 2 - 0.5
    expected = (np.interp(source_col, np.arange(w), ramp) / 255.0 - MEAN[0]) / STD[0]
    got = x[0, 100].double().numpy()
    np.testing.assert_allclose(got, expected, atol=1.5 / 255 / STD[0])


def test_lookwhere_square_and_non_square():
    rng = np.random.default_rng(3)
    pixels = _random_rgb(rng, 182, 182)  # already high_res_size: untouched
    x = decode_image(_encode(pixels), images.lookwhere_transform(182))
    np.testing.assert_allclose(x.double().numpy(), _normalised(pixels), atol=2e-6)
    pixels = _random_rgb(rng, 182, 200)  # wider: centre square, left offset (200 - 182) / 2 = 9
    x = decode_image(_encode(pixels), images.lookwhere_transform(182))
    np.testing.assert_allclose(x.double().numpy(), _normalised(pixels[:, 9:191]), atol=2e-6)


def test_modes_formats_and_sources(tmp_path):
    rng = np.random.default_rng(11)
    pixels = _random_rgb(rng, 256, 256)
    t = images.dyn_perceiver_transform()
    crop = pixels[16:240, 16:240]
    # Greyscale: expanded to three equal channels (PIL's L -> RGB).
    grey = decode_image(_encode(pixels, mode="L"), t)
    g = np.asarray(Image.fromarray(pixels).convert("L"))[16:240, 16:240]
    np.testing.assert_allclose(grey.double().numpy(), _normalised(np.repeat(g[..., None], 3, 2)), atol=2e-6)
    # RGBA: alpha dropped, colour kept.
    rgba = np.concatenate([pixels, rng.integers(0, 256, (256, 256, 1), dtype=np.uint8)], 2)
    x = decode_image(_encode(rgba), t)
    np.testing.assert_allclose(x.double().numpy(), _normalised(crop), atol=2e-6)
    # JPEG from a path (str and pathlib): lossy, so compare with what Pillow decodes, cropped by hand.
    data = _encode(pixels, fmt="JPEG", quality=90)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[16:240, 16:240]
    for source in (path, str(path), data, bytearray(data), memoryview(data)):
        np.testing.assert_allclose(decode_image(source, t).double().numpy(), _normalised(decoded), atol=2e-6)
    # Palette PNG.
    pal = decode_image(_encode(pixels, mode="P"), t)
    p = np.asarray(Image.fromarray(pixels).convert("P").convert("RGB"))[16:240, 16:240]
    np.testing.assert_allclose(pal.double().numpy(), _normalised(p), atol=2e-6)


def test_corrupt_and_unreadable_images_raise_one_error_type(tmp_path):
    t = images.dyn_perceiver_transform()
    good = _encode(_random_rgb(np.random.default_rng(5), 64, 64))
    jpeg = _encode(_random_rgb(np.random.default_rng(6), 64, 64), fmt="JPEG")
    cases = {
        "empty": b"",
        "text": b"this is not an image",
        "png header only": good[:40],
        "truncated png": good[: len(good) // 2],
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "garbage after png magic": good[:8] + bytes(range(256)) * 4,
    }
    for name, data in cases.items():
        with pytest.raises(ImageDecodeError, match="cannot decode image"):
            decode_image(data, t)
        path = tmp_path / f"{name.replace(' ', '_')}.png"
        path.write_bytes(data)
        with pytest.raises(ImageDecodeError, match=str(path.name)):
            decode_image(path, t)
    with pytest.raises(ImageDecodeError, match="missing.png"):
        decode_image(tmp_path / "missing.png", t)
    with pytest.raises(ImageDecodeError):
        decode_image(tmp_path, t)  # a directory
    assert issubclass(ImageDecodeError, ValueError)


def test_bad_arguments():
    t = images.dyn_perceiver_transform()
    with pytest.raises(TypeError, match="bytes or a path"):
        decode_image(123, t)
    with pytest.raises(TypeError, match="EvalTransform"):
        decode_image(_encode(np.zeros((8, 8, 3), np.uint8)), "224")
    with pytest.raises(ValueError, match="resize"):
        EvalTransform(0, 224)
    with pytest.raises(ValueError, match="std"):
        EvalTransform(256, 224, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="crop_pct"):
        images.dyn_perceiver_transform(224, crop_pct=1.5)


def test_transform_for_models():
    from lookfast.models.dyn_perceiver import DynPerceiver
    from lookfast.models.lookwhere import LookWhere

    dp = DynPerceiver.__new__(DynPerceiver)  # only input_size is read: skip building the weights
    torch.nn.Module.__init__(dp)
    dp.input_size = 224
    assert images.transform_for(dp) == images.dyn_perceiver_transform(224)
    lw = LookWhere.from_config(high_res_size=182, k=8, dim=64, num_heads=2, selector_depth=1, extractor_depth=1)
    assert images.transform_for(lw) == images.lookwhere_transform(182)
    with pytest.raises(TypeError, match="DynPerceiver or LookWhere"):
        images.transform_for(torch.nn.Linear(2, 2))


def test_pillow_imported_lazily():
    code = "import sys, lookfast, lookfast.images; print('PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
