"""Safe decoding: every kind of bad file gets its reason; good files come back as RGB."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrina.data.images import IMAGE_SUFFIXES, BadImageError, is_image_path, load_image, to_rgb
from vitrina.data.transforms import eval_transform, train_transform
from vitrina.errors import UserError


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes whose IHDR claims ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _encoded(fmt: str, size: tuple[int, int] = (96, 80)) -> bytes:
    rng = np.random.default_rng(0)  # noise: compresses badly, so a cut lands inside pixel data
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _reason(path: Path, **kw) -> str:
    with pytest.raises(BadImageError) as info:
        load_image(path, **kw)
    assert str(path) in str(info.value)  # the one-line message names the file
    return info.value.reason


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    p = tmp_path / "zero.jpg"
    p.write_bytes(b"")
    assert _reason(p) == "empty"


def test_text_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n" * 20)
    assert _reason(p) == "not-an-image"


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_cut_file_is_truncated(tmp_path: Path, fmt: str, suffix: str) -> None:
    data = _encoded(fmt)
    p = tmp_path / f"cut{suffix}"
    p.write_bytes(data[: len(data) * 2 // 3])
    assert _reason(p) == "truncated"
    # the whole file is fine: the cut, not the format, is what failed
    p.write_bytes(data)
    assert load_image(p).size == (96, 80)


def test_header_bomb_is_too_large_before_decoding(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_claiming(20000, 20000))  # 4e8 pixels: Pillow's own bomb limit fires
    assert p.stat().st_size < 200
    assert _reason(p) == "too-large"
    q = tmp_path / "big.png"
    q.write_bytes(_png_claiming(8000, 8000))  # 6.4e7: under Pillow's limit, over ours
    assert _reason(q) == "too-large"
    assert _reason(q, max_pixels=1000) == "too-large"


def test_byte_limit_is_too_large(tmp_path: Path) -> None:
    p = tmp_path / "ok.png"
    p.write_bytes(_encoded("PNG"))
    assert _reason(p, max_bytes=100) == "too-large"


def test_directory_and_missing_file_are_unreadable(tmp_path: Path) -> None:
    d = tmp_path / "folder.jpg"
    d.mkdir()
    assert _reason(d) == "unreadable"
    assert _reason(tmp_path / "missing.png") == "unreadable"


def test_bad_image_error_is_a_user_error(tmp_path: Path) -> None:
    p = tmp_path / "zero.png"
    p.write_bytes(b"")
    with pytest.raises(UserError):
        load_image(p)


def test_transparent_png_composites_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)  # fully transparent black...
    rgba[:5, :, :] = (200, 0, 0, 255)  # ...except an opaque red top half
    p = tmp_path / "emoji.png"
    Image.fromarray(rgba, "RGBA").save(p)
    im = load_image(p)
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert (arr[5:] == 255).all()  # alpha 0 -> white, not black
    assert (arr[:5] == (200, 0, 0)).all()


def test_palette_with_transparency_and_grey16(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 1)
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)
    arr = np.asarray(load_image(p))
    assert tuple(arr[0, 0]) == (10, 20, 30) and tuple(arr[1, 1]) == (255, 255, 255)
    grey16 = to_rgb(Image.new("I;16", (3, 3), 65535))
    assert grey16.mode == "RGB" and grey16.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    p = tmp_path / "rotated.jpg"
    im.save(p, exif=exif)
    assert load_image(p).size == (20, 40)


def test_draft_decodes_jpeg_smaller_but_not_below_target(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    p.write_bytes(_encoded("JPEG", size=(800, 640)))
    im = load_image(p, draft_size=100)
    assert im.size[0] < 800 and min(im.size) >= 100


def test_suffixes() -> None:
    assert {".jpg", ".jpeg", ".png"} <= IMAGE_SUFFIXES
    assert is_image_path("A/B.JPG") and not is_image_path("captions.jsonl")


def test_transforms_give_normalised_square_tensors(tmp_path: Path) -> None:
    im = Image.new("RGB", (60, 30), (255, 255, 255))
    x = eval_transform(16)(im)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))  # white -> (1 - 0.5) / 0.5
    torch.manual_seed(0)
    y = train_transform(16)(Image.new("L", (30, 60), 0))  # grey input is accepted too
    assert y.shape == (3, 16, 16) and torch.isfinite(y).all()


def test_threads_decode_safely_and_leave_warning_filters_alone(tmp_path: Path) -> None:
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    bomb, good = tmp_path / "bomb.png", tmp_path / "good.png"
    bomb.write_bytes(_png_claiming(20000, 20000))
    good.write_bytes(_encoded("PNG", size=(16, 16)))
    before = list(warnings.filters)

    def outcome(path: Path) -> str:
        try:
            return f"{load_image(path).size}"
        except BadImageError as e:
            return e.reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(outcome, [bomb, good] * 20))
    assert results == ["too-large", "(16, 16)"] * 20
    assert warnings.filters == before


def test_normalisation_keeps_the_arithmetic_and_its_input() -> None:
    from vitrina.data.transforms import EvalTransform

    transform = EvalTransform(8, (0.48, 0.45, 0.40), (0.27, 0.26, 0.28))
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8))
    mean = torch.tensor((0.48, 0.45, 0.40)).view(3, 1, 1) * 255.0
    std = torch.tensor((0.27, 0.26, 0.28)).view(3, 1, 1) * 255.0
    assert torch.equal(transform.normalize(pixels), (pixels.float() - mean) / std)  # bit for bit
    as_float = pixels.float()
    transform.normalize(as_float)
    assert torch.equal(as_float, pixels.float())  # a float batch is not normalised in place
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert torch.equal(transform(image), (torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() - mean) / std)


def test_image_bytes_decode_as_the_file_does(tmp_path: Path) -> None:
    from vitrina.data.images import decode_image_bytes, read_image_bytes

    for fmt, suffix in (("JPEG", ".jpg"), ("PNG", ".png")):
        path = tmp_path / f"a{suffix}"
        path.write_bytes(_encoded(fmt, size=(300, 200)))
        data = read_image_bytes(path)
        assert data == path.read_bytes()
        from_bytes = decode_image_bytes(data, path, draft_size=64)
        assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(path, draft_size=64)))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty"):
        read_image_bytes(tmp_path / "empty.jpg")
    with pytest.raises(BadImageError, match="unreadable"):
        read_image_bytes(tmp_path)
    with pytest.raises(BadImageError, match="too-large"):
        read_image_bytes(path, max_bytes=10)
