"""The one way vitrina writes a file that a reader may open at any moment: all of it, or none of it.

``atomic_write(path, write)`` lets ``write`` fill a temporary file in the same folder, fsyncs it,
renames it over ``path`` and fsyncs the folder, so after a crash or a kill the path holds either
the old complete file or the new complete one, and the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then publish it as ``path``.

    ``write`` gets a path (for writers such as safetensors' ``save_file`` or ``faiss.write_index``);
    the temporary file is removed if it raises. ``durable=False`` skips the two fsyncs: still all or
    nothing for readers and after a kill, but not after a power loss (for files that are cheap to
    make again, written by the thousand: exported data sets, thumbnails). Returns ``path``.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Publish ``data`` as the whole content of ``path`` (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Publish ``text`` (UTF-8) as the whole content of ``path`` (see ``atomic_write``)."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)
