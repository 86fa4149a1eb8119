"""Pictures in and out of the server: uploaded query images, indexed files by id, cached thumbnails.

Nothing here takes a path from a request. Indexed files are found by id in the index, and a stored
path is used only if it still lies inside the collection root; uploads are decoded from memory
through the same safe decoder as the indexer, restricted to a few well-known formats.
"""

from __future__ import annotations

import io
import mimetypes
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vitrina.atomic import atomic_write
from vitrina.data.images import IMAGE_SUFFIXES, BadImageError, load_image

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 50_000_000
# Formats PIL may even try on an upload: no EPS (Ghostscript), no exotic plug-ins.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
_FORMAT_NAMES = "PNG, JPEG, GIF, BMP, WebP or TIFF"
THUMB_SIZE = 256


class UploadError(Exception):
    """An upload that cannot be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, *, declared_type: str | None = None) -> Image.Image:
    """Bytes of an uploaded file -> RGB image, or ``UploadError`` (413 too big, 415 not an image, 400 broken)."""
    if declared_type and declared_type != "application/octet-stream" and not declared_type.startswith("image/"):
        raise UploadError(415, f"upload: type {declared_type!r} is not an image; send a {_FORMAT_NAMES} file")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(413, f"upload: {len(data)} bytes, at most {MAX_UPLOAD_BYTES} are accepted")
    if not data:
        raise UploadError(400, "upload: the file is empty")
    # Identify the format from the header only, among the allowed ones, before any decoding.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS).close()
    except UnidentifiedImageError:
        raise UploadError(415, f"upload: not an image of a supported type ({_FORMAT_NAMES})") from None
    except Image.DecompressionBombError:
        raise UploadError(413, f"upload: more than {MAX_UPLOAD_PIXELS} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise UploadError(400, "upload: the image header is broken") from None
    # load_image reads a file: it checks the pixel count before decoding and composites alpha on white.
    with tempfile.TemporaryDirectory(prefix="vitrina-upload-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return load_image(path, max_pixels=MAX_UPLOAD_PIXELS, max_bytes=MAX_UPLOAD_BYTES)
        except BadImageError as error:
            status = {"too-large": 413, "not-an-image": 415}.get(error.reason, 400)
            detail = f" ({error.detail})" if error.detail else ""
            raise UploadError(status, f"upload: {error.reason}{detail}") from None


def indexed_file(root: Path, stored_path: str) -> Path | None:
    """The absolute path of an indexed file if it is a regular image file inside ``root``, else None.

    ``stored_path`` comes from the index, never from a request; checking it anyway means a tampered
    index or a file swapped for a link to elsewhere cannot make the server read outside the collection.
    """
    root = Path(os.path.realpath(root))
    path = Path(os.path.realpath(stored_path if Path(stored_path).is_absolute() else root / stored_path))
    if not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        return None
    return path


def media_type(path: Path) -> str:
    """The ``Content-Type`` of an image file, by its suffix."""
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


@dataclass(frozen=True)
class ThumbCache:
    """JPEG thumbnails (longest side ``size``) in ``folder``, keyed by id, file size and mtime.

    A changed file gets a new key, so a stale thumbnail is never served; files are written to a
    temporary name and renamed, so concurrent requests never read half a thumbnail.
    """

    folder: Path
    size: int = THUMB_SIZE

    def path_for(self, item_id: int, source: Path) -> Path:
        """Where the thumbnail of ``source`` (indexed as ``item_id``) lives in the cache, made or not."""
        stat = source.stat()
        return self.folder / f"{item_id}-{stat.st_size}-{stat.st_mtime_ns}-{self.size}.jpg"

    def get(self, item_id: int, source: Path) -> Path:
        """The cached thumbnail of ``source``, made first if missing; ``BadImageError`` if it cannot be read."""
        target = self.path_for(item_id, source)
        if target.is_file():
            return target
        image = load_image(source, draft_size=self.size)
        image.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob(f"{item_id}-*.jpg"):  # an older version of this item
            old.unlink(missing_ok=True)
        atomic_write(target, lambda tmp: image.save(tmp, format="JPEG", quality=85), durable=False)
        return target
