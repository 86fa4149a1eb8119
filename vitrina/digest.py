"""Digests that name a model's weights: two models with the same digest produce the same vectors.

An index stores the digest of the model that made each version's vectors, so a differently trained
checkpoint, or one retrained in place under the same folder name, is told apart from the original.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_sha256(paths: Iterable[str | os.PathLike]) -> str:
    """One digest of several weight files (sharded checkpoints): sha256 over their names and digests."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def tensors_sha256(state_dict: Mapping) -> str:
    """sha256 (hex) of a state dict's names, dtypes, shapes and bytes, in name order.

    For weights that exist only in memory (a seeded preset, a model built by a library), where there
    is no file to hash.
    """
    import torch  # lazily: the query path reads digests without loading torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return digest.hexdigest()


def short(digest: str | None) -> str:
    """The first 12 hex digits, for messages and tables."""
    return (digest or "none")[:12]
