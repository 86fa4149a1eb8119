"""Which model answers queries for a version of an index, checked against the weights it was built with.

A version records the reference and the weights digest of the model that embedded its images. A
query must be encoded by the same weights, or its scores mean nothing: a checkpoint retrained in
place under the same folder is refused; a model the user names explicitly (``--model``) is trusted
with a warning, since querying an index with, say, a distilled student that kept its teacher's text
tower is a legitimate choice.

The runtime (``query_encoder``): ``torch`` loads the model; ``onnx`` runs the towers the writer exported
for the version (``vitrina.runtime``: no torch, no transformers), checked against the same weights when
they were exported; ``auto`` runs the exported towers where they are usable and loads the model only
for a tower that is not (none exported yet, a rejected export, a model that cannot be exported).
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


RUNTIMES = ("auto", "onnx", "torch")


def query_encoder(
    version: Version,
    index_dir: Path,
    *,
    model_ref: str | None = None,
    runtime: str = "torch",
    precision: str = "fp32",
) -> Encoder:
    """The encoder that answers queries for ``version`` with ``runtime`` (see the module docstring).

    A model the user names (``model_ref``) always runs in PyTorch: the exported towers are the version's own.
    ``precision`` bf16 runs the PyTorch towers at bf16 autocast; int8 runs the exported towers' int8 twins
    (``vitrina.models.quantize_onnx``) under ``auto``/``onnx``, PyTorch's int8 Linear layers under ``torch``
    or for a tower without a usable twin (``vitrina.models.precision``).
    """
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime!r} is unknown; use one of {', '.join(RUNTIMES)}")
    if precision != "fp32":
        from vitrina.models.precision import check_precision, with_precision

        check_precision(precision)
        if runtime == "onnx" and (precision != "int8" or model_ref is not None):
            raise UserError(f"--precision {precision} runs the PyTorch towers here; use --runtime auto or torch")
        if precision != "int8" or runtime == "torch" or model_ref is not None:
            return with_precision(encoder_for(version, index_dir, model_ref=model_ref), precision)
    if model_ref is not None and runtime == "onnx":
        raise UserError("--runtime onnx runs the index's own exported towers; drop --model, or use --runtime torch")
    if runtime == "torch" or model_ref is not None:
        return encoder_for(version, index_dir, model_ref=model_ref)
    from vitrina.index.ann import version_dir
    from vitrina.runtime import OnnxQueryEncoder, TowersUnavailable
    from vitrina.runtime.towers import towers_dir

    def refuse(reason: str, *, exported: bool) -> UserError:
        how = "use --runtime auto or torch"
        if not exported:
            how += f", or export its towers: `vitrina index FOLDER --model {version.model_ref} --out {index_dir}`"
        return UserError(f"{index_dir}: {version.name} cannot answer this query without PyTorch ({reason}); {how}")

    def torch_encoder() -> Encoder:
        if precision == "int8":  # a tower without an int8 twin runs PyTorch's int8 Linear layers
            from vitrina.models.precision import with_precision

            return with_precision(encoder_for(version, index_dir), precision)
        return encoder_for(version, index_dir)

    def refused() -> Encoder:
        raise refuse("; ".join(r for r in (towers.why_not("text"), towers.why_not("image")) if r), exported=True)

    try:
        towers = OnnxQueryEncoder.load(
            towers_dir(version_dir(index_dir, version.id)),
            digest=version.digest,
            fallback=refused if runtime == "onnx" else torch_encoder,
            precision=precision,
        )
    except TowersUnavailable as error:
        if runtime == "onnx":
            raise refuse(error.reason, exported=False) from None
        return torch_encoder()
    return towers
