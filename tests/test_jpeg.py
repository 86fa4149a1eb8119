"""The fast JPEG path gives Pillow's pixels exactly, and leaves to Pillow every file it should not decode."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitrina.data import jpeg
from vitrina.data.images import MAX_PIXELS, BadImageError, _decode, decode_image_bytes
from vitrina.data.transforms import EvalTransform
from vitrina.index.decode import Decoding, Job, decode

pytestmark = pytest.mark.skipif(jpeg.simplejpeg is None, reason="simplejpeg has no wheel for this platform")


def _picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour picture with some edges: what a photo's blocks look like to a JPEG coder."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127 + 100 * np.sin(x / (7 + 5 * c) + y / (11 + 3 * c) + c) for c in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
    pixels[height // 3 : height // 2, width // 4 : width // 2] = (250, 20, 40)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _pillow(data: bytes, draft_size: int | None) -> np.ndarray:
    """The pixels Pillow gives: its own path, the one every JPEG took before the fast one."""
    return np.asarray(_decode(io.BytesIO(data), "x.jpg", max_pixels=MAX_PIXELS, draft_size=draft_size))


CASES = {
    "colour 4:2:0": dict(quality=85),
    "colour 4:4:4": dict(quality=95, subsampling=0),
    "progressive": dict(quality=80, progressive=True),
    "optimised": dict(quality=70, optimize=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", [(128, 128), (401, 299), (640, 480), (37, 53)])
@pytest.mark.parametrize("draft_size", [None, 28, 48, 100, 224])
def test_fast_path_gives_pillows_pixels(case, size, draft_size):
    data = _jpeg(_picture(*size), **CASES[case])
    fast = jpeg.decode_jpeg(data, draft_size, MAX_PIXELS)
    assert fast is not None and fast.mode == "RGB"
    expected = _pillow(data, draft_size)
    assert np.array_equal(np.asarray(fast), expected), (fast.size, expected.shape)
    assert np.array_equal(np.asarray(decode_image_bytes(data, "x.jpg", draft_size=draft_size)), expected)


@pytest.mark.parametrize("draft_size", [None, 48])
def test_greyscale_jpeg_stays_grey_only_when_asked(draft_size):
    data = _jpeg(_picture(128, 96)[:, :, 1])
    fast = jpeg.decode_jpeg(data, draft_size, MAX_PIXELS)
    assert fast.mode == "L"
    assert np.array_equal(np.asarray(fast.convert("RGB")), _pillow(data, draft_size))
    assert decode_image_bytes(data, "x.jpg", draft_size=draft_size).mode == "RGB"
    assert decode_image_bytes(data, "x.jpg", draft_size=draft_size, keep_grey=True).mode == "L"


@pytest.mark.parametrize("width,height", [(128, 128), (401, 299), (97, 500), (5000, 12), (49, 48)])
@pytest.mark.parametrize("draft_size", [1, 28, 48, 64, 224])
def test_draft_divisor_is_pillows(width, height, draft_size):
    image = Image.open(io.BytesIO(_jpeg(_picture(width, height))))
    image.draft("RGB", (draft_size, draft_size))
    divisor = jpeg.draft_divisor(width, height, draft_size)
    assert image.size == (-(-width // divisor), -(-height // divisor))


def _with_exif(data: bytes, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_goes_to_pillow_and_is_turned_upright():
    pixels = _picture(120, 80)
    plain = _jpeg(pixels, quality=90)
    rotated = _with_exif(plain, 6)  # shown turned 90 degrees clockwise
    assert not jpeg.has_exif(plain) and jpeg.has_exif(rotated)
    assert jpeg.decode_jpeg(rotated, None, MAX_PIXELS) is None
    assert decode_image_bytes(rotated, "x.jpg").size == (80, 120)


def test_has_exif_walks_past_other_segments():
    """An Exif block after JFIF and an ICC profile is still found (APP1 need not come first)."""
    data = _jpeg(_picture(64, 64), quality=90, icc_profile=b"\0" * 3000)
    assert not jpeg.has_exif(data)
    segment = b"\xff\xe1" + (2 + 6 + 8).to_bytes(2, "big") + b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08"
    marker_end = 2 + 2 + int.from_bytes(data[4:6], "big")  # after SOI and the JFIF APP0
    assert jpeg.has_exif(data[:marker_end] + segment + data[marker_end:])


def test_unusual_files_go_to_pillow(tmp_path):
    colour = _jpeg(_picture(64, 64))
    cmyk = io.BytesIO()
    Image.fromarray(_picture(64, 64)).convert("CMYK").save(cmyk, "JPEG")
    assert jpeg.decode_jpeg(cmyk.getvalue(), 32, MAX_PIXELS) is None
    assert decode_image_bytes(cmyk.getvalue(), "c.jpg").mode == "RGB"
    assert jpeg.decode_jpeg(colour, None, max_pixels=64 * 64 - 1) is None  # Pillow raises the too-large
    with pytest.raises(BadImageError, match="too-large"):
        decode_image_bytes(colour, "big.jpg", max_pixels=64 * 64 - 1)
    truncated = colour[: len(colour) // 2]
    assert jpeg.decode_jpeg(truncated, None, MAX_PIXELS) is None
    with pytest.raises(BadImageError, match="truncated"):
        decode_image_bytes(truncated, "half.jpg")
    png = io.BytesIO()
    Image.fromarray(_picture(64, 64)).save(png, "PNG")
    assert jpeg.decode_jpeg(png.getvalue(), None, MAX_PIXELS) is None


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_indexer_decodes_grey_files_to_the_same_pixels(tmp_path, suffix):
    """The indexer keeps a greyscale file in one band through the resize: the same tensor as resizing RGB."""
    path = tmp_path / f"grey{suffix}"
    Image.fromarray(_picture(128, 128)[:, :, 0]).save(path)
    job = Job(path.name, path, path.stat().st_size, 0.0, None, None, True)
    transform = EvalTransform(48)
    grey = decode(job, transform.to_uint8, transform.size, keep_grey=True)
    rgb = decode(job, transform.to_uint8, transform.size, keep_grey=False)
    assert grey.pixels.shape == (3, 48, 48) and torch.equal(grey.pixels, rgb.pixels)
    assert grey.content_hash == rgb.content_hash
    decoding = Decoding.of(transform)  # what the indexer's decoders run: grey kept for a split transform only
    assert decoding.keep_grey and torch.equal(decoding(job).pixels, rgb.pixels)
    assert not Decoding.of(lambda image: transform(image.convert("RGB"))).keep_grey
