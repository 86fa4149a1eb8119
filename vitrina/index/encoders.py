"""Which model answers queries for a version of an index, checked against the weights it was built with.

A version records the reference and the weights digest of the model that embedded its images. A
query must be encoded by the same weights, or its scores mean nothing: a checkpoint retrained in
place under the same folder is refused; a model the user names explicitly (``--model``) is trusted
with a warning, since querying an index with, say, a distilled student that kept its teacher's text
tower is a legitimate choice.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from vitrina.digest import short
from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.index.store import Version


def check_encoder(encoder: Encoder, version: Version, index_dir: Path, *, chosen: bool) -> Encoder:
    """Refuse an encoder of another width or kind; for other weights refuse unless ``chosen`` by the user (warn)."""
    identity = encoder.identity
    if identity.get("embed_dim") != version.embed_dim or identity.get("kind") != version.identity.get("kind"):
        raise UserError(
            f"{index_dir}: {version.name} holds {version.embed_dim}-d vectors of a {version.identity.get('kind')} "
            f"model ({version.model_ref}); the given model is a {identity.get('embed_dim')}-d "
            f"{identity.get('kind')}: use the model the version was built with"
        )
    digest = identity.get("digest")
    if version.digest is None or digest == version.digest:
        return encoder
    if chosen:
        warnings.warn(
            f"{index_dir}: {version.describe()} is searched with other weights (digest {short(digest)}): "
            "scores are only meaningful if its text tower matches the one that built the index",
            stacklevel=3,
        )
        return encoder
    raise UserError(
        f"{index_dir}: {version.name} was built with {version.model_ref} (digest {short(version.digest)}), which now "
        f"holds other weights (digest {short(digest)}); re-embed with `vitrina index FOLDER --model "
        f"{version.model_ref} --out {index_dir} --new-version`, or give --model with the original weights"
    )


def encoder_for(version: Version, index_dir: Path, *, model_ref: str | None = None) -> Encoder:
    """Load the model of ``version`` (or ``model_ref``, the user's explicit choice) and check it."""
    from vitrina.checkpoint import load_encoder

    encoder = load_encoder(model_ref or version.model_ref)
    return check_encoder(encoder, version, index_dir, chosen=model_ref is not None)
