"""Decode one image file safely: every failure becomes a ``BadImageError`` with a short reason.

Reasons: ``unreadable`` (missing, a folder, no permission), ``empty`` (zero bytes), ``too-large``
(over the byte or pixel limit: checked from the header, before any pixel is decoded, so a
decompression bomb costs nothing), ``not-an-image`` and ``truncated``. Good files come back as RGB
with EXIF orientation applied and transparency composited onto white.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitrina.data.jpeg import decode_jpeg
from vitrina.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
MAX_PIXELS = 50_000_000  # ~7000 x 7000: far above any photo collection, far below a bomb
MAX_BYTES = 100 * 2**20
BACKGROUND = (255, 255, 255)

# EXIF orientation tag -> the transposition that displays the image upright
_ORIENTATION = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


class BadImageError(UserError):
    """A file that cannot be used as an image; ``reason`` is one word for ledgers and counts."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparent pixels become white (emoji and clip art are RGBA)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    # Only the orientation tag is read: ImageOps.exif_transpose also rewrites the EXIF block (slow).
    if image.format == "JPEG" and "exif" not in image.info:  # no APP1 Exif segment: nothing to parse
        return image
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: show the pixels as stored
        return image
    for step in _ORIENTATION.get(orientation, ()):
        image = image.transpose(step)
    return image


def _checked_size(path: str | os.PathLike, max_bytes: int) -> int:
    """The file's size in bytes (one ``stat``), or ``BadImageError`` for a non-file, an empty or a too-large one."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise BadImageError(path, "unreadable", error.strerror or type(error).__name__) from None
    if not stat.S_ISREG(info.st_mode):
        raise BadImageError(path, "unreadable", "not a regular file")
    if info.st_size == 0:
        raise BadImageError(path, "empty", "0 bytes")
    if info.st_size > max_bytes:
        raise BadImageError(path, "too-large", f"{info.st_size} bytes, limit {max_bytes}")
    return info.st_size


def read_image_bytes(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of the image file ``path`` (checked as ``load_image`` checks it), or ``BadImageError``.

    The indexer reads a file once: it hashes these bytes and decodes them with ``decode_image_bytes``.
    """
    size = _checked_size(path, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)  # one buffer of the size the stat gave (``read(max_bytes)`` allocates it all)
            if len(data) > size:  # grew since the stat: read on, up to the limit
                data += f.read(max_bytes + 1 - len(data))
    except OSError as error:
        raise BadImageError(path, "unreadable", error.strerror or type(error).__name__) from None
    if not data:
        raise BadImageError(path, "empty", "0 bytes")
    if len(data) > max_bytes:  # grew since the stat
        raise BadImageError(path, "too-large", f"over {max_bytes} bytes")
    return data


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    draft_size: int | None = None,
) -> Image.Image:
    """The upright RGB image in ``path``, or ``BadImageError``.

    ``draft_size``: for JPEG, let the decoder scale down by 1/2, 1/4 or 1/8 while both sides stay at
    least this large (much faster for thumbnails and small model inputs).
    """
    _checked_size(path, max_bytes)
    return _decode(path, path, max_pixels=max_pixels, draft_size=draft_size)


def decode_image_bytes(
    data: bytes,
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
    keep_grey: bool = False,
) -> Image.Image:
    """``load_image`` for a file's bytes already read (``read_image_bytes``); ``path`` names it in errors.

    ``keep_grey``: a greyscale image comes back in mode L (one band: a third of the work for a resize that
    follows; ``to_rgb`` after it gives the same pixels as before it). A JPEG takes the fast path
    (``vitrina.data.jpeg``) where it can, with Pillow's pixels.
    """
    image = decode_jpeg(data, draft_size, max_pixels)
    if image is None:
        image = _decode(io.BytesIO(data), path, max_pixels=max_pixels, draft_size=draft_size, keep_grey=True)
    return image if keep_grey else to_rgb(image)  # one place turns either path's greyscale image into RGB


def _decode(
    source, path: str | os.PathLike, *, max_pixels: int, draft_size: int | None, keep_grey: bool = False
) -> Image.Image:
    """Open ``source`` (a path or a file object), check its header, decode: the upright RGB (or L) image."""
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as error:
        raise BadImageError(path, "too-large", str(error).split(" could be")[0]) from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not-an-image", "no image format recognised") from None
    except OSError as error:
        # An I/O error carries an errno; Pillow's own complaints about a broken header do not.
        reason = "truncated" if "truncat" in str(error).lower() else "unreadable" if error.errno else "not-an-image"
        raise BadImageError(path, reason, str(error)) from None
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(path, "too-large", f"{width}x{height} pixels, limit {max_pixels}")
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        try:
            image.load()  # Pillow closes a single-frame file it opened itself once loaded
        except Image.DecompressionBombError as error:  # a later frame of an animated file
            raise BadImageError(path, "too-large", str(error)) from None
        except (OSError, EOFError, SyntaxError, ValueError) as error:
            raise BadImageError(path, "truncated", str(error) or type(error).__name__) from None
    except BadImageError:
        image.close()
        raise
    image = _upright(image)
    return image if keep_grey and image.mode == "L" else to_rgb(image)
