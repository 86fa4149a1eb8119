"""Export an encoder's query towers to ONNX for the torch-free query path (``vitrina.runtime``), checked first.

The writer's half of the light query path. For one encoder (the model of one index version):

1. take its towers as modules that end in unit vectors: text (token ids + attention mask -> (B, D)) and
   image (pixels -> (B, D)); a tower this kind of model cannot offer is ``unavailable``, with the reason;
2. export each with ``torch.onnx.export`` (the TorchScript exporter: on the demo model it takes 2.9 s
   where the torch.export-based one takes 15 s, and both give the same outputs), dynamic batch (and
   sequence) axes, then let ONNX Runtime apply its portable graph optimisations once and save the result,
   weights in a file beside the graph (a query then loads it in ~0.06 s instead of ~0.3 s);
3. load what was written exactly as a query will (``OnnxQueryEncoder``: our tokenizer file, numpy
   preprocessing, the same session options) and compare its vectors for probe texts (short, long and
   truncated, unicode, empty) and probe images (odd sizes and modes) with the PyTorch encoder's: a tower
   whose max abs difference exceeds ``TOLERANCE`` is ``rejected`` (recorded with the difference; queries
   then run PyTorch);
4. publish into ``towers/``: the old manifest removed first, each file atomically, the manifest last.

Only writers call this (the indexer, under the index's writer lock); see ``vitrina.runtime.towers`` for
the folder's layout. Kept out of ``vitrina.models.pretrained``: it serves every encoder kind, ours first,
and it needs ``onnx``/``onnxruntime`` that a model's definition does not.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from torch import nn

from vitrina.atomic import atomic_write, atomic_write_text, fsync_dir
from vitrina.encoder import Encoder
from vitrina.runtime.encoder import OnnxQueryEncoder
from vitrina.runtime.preprocess import unsupported
from vitrina.runtime.towers import (
    DATA_SUFFIX,
    FORMAT,
    MANIFEST,
    OK,
    REJECTED,
    TOKENIZER_FILE,
    TOWER_FILES,
    UNAVAILABLE,
    is_current,
    read_manifest,
)

TOLERANCE = 1e-4  # max abs difference of unit vectors, ONNX Runtime vs PyTorch
OPSET = 17
STAGING = ".towers-staging"  # beside towers/: a killed export leaves only this, removed by the next one
OUTPUT = "unit_vectors"

PROBE_TEXTS = [
    "",
    " ",
    "a",
    "a photo of a cat",
    "A RED double-decker bus crossing a stone bridge at dusk, seen from far away, in the rain",
    "émoji ✨ 猫 — naïve café, Ünïcödé ÀÉÎ 👍🏽 ﬁ",
]
LONG_TEXT = "tokens " * 300  # past every context length here: truncated (checked alone: it pads a batch to full length)


def probe_images() -> list[Image.Image]:
    """A few deterministic images of odd sizes and modes (RGB noise, grey, RGBA, tiny, wide)."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8), "RGB")
    ramp = np.tile(np.linspace(0, 255, 97, dtype=np.uint8), (40, 1))  # (40, 97)
    grey = Image.fromarray(ramp, "L")
    rgba = Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8), "RGBA")
    tiny = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8), "RGB")
    return [noise, grey, rgba, tiny]


# --- the towers of an encoder --------------------------------------------------------------------


class _ClipText(nn.Module):
    """Our CLIP's text side: (B, L) ids and mask -> (B, D) unit vectors."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = self.clip.text_features({"input_ids": input_ids, "attention_mask": attention_mask})  # (B, Ct)
        return F.normalize(self.clip.project_text(features).float(), dim=-1)


class _ClipImage(nn.Module):
    """Our CLIP's image side: (B, 3, H, W) -> (B, D) unit vectors."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.project_image(self.clip.image_features(pixels)).float(), dim=-1)


class _WrappedImage(nn.Module):
    """A wrapped encoder's image side (``WrappedEncoder.image_embedding``) -> (B, D) unit vectors."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.model = encoder.model  # registered, so its weights are the graph's
        self.embedding = encoder.image_embedding

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(pixels).float(), dim=-1)


@dataclass
class QueryTowers:
    """An encoder's towers as modules, or the reason each one is not there."""

    text: nn.Module | None = None
    tokenizer: Tokenizer | None = None
    text_reason: str = ""
    image: nn.Module | None = None
    image_size: int = 0
    preprocess: dict = field(default_factory=dict)
    image_reason: str = ""


def _minilm_tokenizer(tower) -> Tokenizer:
    """The MiniLM tower's tokenizer out of transformers, set as ``MiniLMTower.tokenize`` calls it."""
    hf = tower.tokenizer
    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())  # a clean copy, without transformers' wrappers
    tokenizer.enable_truncation(max_length=tower.max_length)  # truncation=True, max_length=...
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=hf.pad_token_id, pad_token=hf.pad_token)  # padding=True: to the longest
    return tokenizer


def query_towers(encoder: Encoder) -> QueryTowers:
    """The text and image towers ``encoder`` can export (see ``QueryTowers``)."""
    from vitrina.models.clip import CLIPEncoder
    from vitrina.models.pretrained.encoders import ImageOnlyEncoder, OpenCLIPEncoder, WrappedEncoder

    towers = QueryTowers(preprocess=_describe(encoder.image_transform))
    if isinstance(encoder, CLIPEncoder):
        clip = encoder.model
        towers.text = _ClipText(clip).eval()
        if clip.tokenizer is not None:
            towers.tokenizer = Tokenizer.from_str(clip.tokenizer.to_str())
        else:  # the MiniLM tower brings its own tokenizer
            towers.tokenizer = _minilm_tokenizer(clip.text)
        towers.image, towers.image_size = _ClipImage(clip).eval(), clip.config.vision.image_size
    elif isinstance(encoder, WrappedEncoder):
        towers.image = _WrappedImage(encoder).eval()
        towers.image_size = int(towers.preprocess.get("size") or 0)
        if isinstance(encoder, ImageOnlyEncoder):
            towers.text_reason = "an image-only model has no text tower"
        elif isinstance(encoder, OpenCLIPEncoder):
            towers.text_reason = "open_clip's own tokenizer has no tokenizers twin here"
        else:
            towers.text_reason = f"{type(encoder).__name__} does not say how its text tower tokenizes"
    else:
        towers.text_reason = towers.image_reason = f"{type(encoder).__name__} offers no towers to export"
    if towers.image is not None:
        reason = unsupported(towers.preprocess) or ("" if towers.image_size else "no image size")
        if reason:
            towers.image, towers.image_reason = None, reason
    return towers


def _describe(transform) -> dict:
    describe = getattr(transform, "describe", None)
    return describe() if callable(describe) else {"transform": type(transform).__name__}


def tokenizer_settings(tokenizer: Tokenizer) -> dict:
    """What reproduces the PyTorch path's token ids, as data (``tokenizer.json`` holds all of it)."""
    truncation, padding = tokenizer.truncation or {}, tokenizer.padding or {}
    specials = {
        str(i): token.content for i, token in sorted(tokenizer.get_added_tokens_decoder().items()) if token.special
    }
    normalizer = tokenizer.normalizer
    return {
        "library": "tokenizers",
        "file": TOKENIZER_FILE,
        "context_length": truncation.get("max_length"),  # special tokens included
        "truncation": truncation.get("strategy"),
        "padding": f"to {padding['length']} tokens" if padding.get("length") else "to the longest text",
        "pad_id": padding.get("pad_id"),
        "pad_token": padding.get("pad_token"),
        "lowercase": normalizer is not None and normalizer.normalize_str("A") == "a",
        "normalizer": repr(normalizer),
        "special_tokens": specials,
        "empty_text_ids": [i for i, m in zip(*_ids_and_mask(tokenizer, ""), strict=True) if m],
        "trim_padding": True,
    }


def _ids_and_mask(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    encoding = tokenizer.encode(text)
    return encoding.ids, encoding.attention_mask


# --- export, check, publish ----------------------------------------------------------------------


@dataclass
class ExportReport:
    """What ``export_towers`` did: the manifest it published and how long it took."""

    manifest: dict
    seconds: float

    def summary(self) -> str:
        """``text ok (2.1e-07) (int8 ok cos 0.966), image ok (1.9e-07) (int8 ok cos 0.997) in 3.1 s``."""
        parts = []
        for tower in TOWER_FILES:
            entry = self.manifest[tower]
            detail = f" ({entry['max_abs_diff']:.1e})" if "max_abs_diff" in entry else ""
            int8 = entry.get("int8")
            if int8:  # the int8 twin's status and its worst probe cosine
                cosine = f" cos {int8['min_cosine']:.3f}" if "min_cosine" in int8 else ""
                detail += f" (int8 {int8['status']}{cosine})"
            parts.append(f"{tower} {entry['status']}{detail}" + (f": {entry['reason']}" if entry.get("reason") else ""))
        return f"{', '.join(parts)} in {self.seconds:.1f} s"


def towers_current(folder: str | Path, digest: str | None) -> bool:
    """Whether ``folder`` holds a manifest of towers exported from the weights ``digest``."""
    return is_current(read_manifest(folder), digest)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _export_graph(module: nn.Module, example: tuple, names: list[str], dynamic: dict, raw: Path) -> None:
    """``module`` -> an ONNX file at ``raw`` (one file, weights inside), dynamic axes as given."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings are not the user's
        torch.onnx.export(
            module,
            example,
            str(raw),
            input_names=names,
            output_names=[OUTPUT],
            dynamic_axes={**dynamic, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            external_data=False,
            do_constant_folding=True,
        )


def _optimize(raw: Path, out: Path) -> None:
    """Save ``raw`` after ONNX Runtime's portable (extended) optimisations as ``out`` + ``out.data``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # not ALL: hardware-specific
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + DATA_SUFFIX)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 3
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    raw.unlink()


def _export_text(towers: QueryTowers, staging: Path) -> dict:
    module = towers.text
    sample = towers.tokenizer.encode_batch(["a photo of a cat", "a dog"])
    device = _device(module)
    ids = torch.tensor([e.ids for e in sample], dtype=torch.long, device=device)
    mask = torch.tensor([e.attention_mask for e in sample], dtype=torch.long, device=device)
    names = ["input_ids", "attention_mask"]
    dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
    _export_graph(module, (ids, mask), names, dynamic, staging / "text.raw.onnx")
    _optimize(staging / "text.raw.onnx", staging / TOWER_FILES["text"])
    atomic_write_text(staging / TOKENIZER_FILE, towers.tokenizer.to_str())
    return {"status": OK, "file": TOWER_FILES["text"], "tokenizer": tokenizer_settings(towers.tokenizer)}


def _export_image(towers: QueryTowers, staging: Path) -> dict:
    size = towers.image_size
    pixels = torch.zeros(2, 3, size, size, device=_device(towers.image))
    _export_graph(towers.image, (pixels,), ["pixels"], {"pixels": {0: "batch"}}, staging / "image.raw.onnx")
    _optimize(staging / "image.raw.onnx", staging / TOWER_FILES["image"])
    return {"status": OK, "file": TOWER_FILES["image"], "preprocess": towers.preprocess}


def _max_diff(reference, candidate: np.ndarray) -> float:
    reference = reference.detach().cpu().numpy() if hasattr(reference, "detach") else np.asarray(reference)
    if reference.shape != candidate.shape:
        return float("inf")
    return float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max())


def _check(encoder: Encoder, runtime: OnnxQueryEncoder, tower: str) -> float:
    """Max abs difference of ``runtime``'s vectors from ``encoder``'s on the probes, batched and alone."""
    if tower == "text":
        batches = [PROBE_TEXTS, [LONG_TEXT], [""], ["a photo of a cat"]]
        return max(_max_diff(encoder.encode_text(b), runtime.encode_text(b)) for b in batches)
    images = probe_images()
    worst = 0.0
    for batch in [images, images[:1]]:
        ours = torch.stack([encoder.image_transform(image) for image in batch])  # (B, 3, H, W)
        theirs = np.stack([runtime.image_transform(image) for image in batch])  # (B, 3, H, W)
        worst = max(worst, _max_diff(encoder.encode_image(ours), runtime.encode_image(theirs)))
    return worst


def _versions() -> dict:
    """The versions of what made and checked the graphs (read from the installed metadata: no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "onnx", "onnxruntime", "tokenizers", "vitrina"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def export_towers(encoder: Encoder, folder: str | Path, *, tolerance: float | None = None) -> ExportReport:
    """Export, check and publish ``encoder``'s towers into ``folder`` (a version's ``towers/``). Writer only.

    Never raises for a tower that cannot be exported or does not match: the manifest records it as
    ``unavailable`` or ``rejected`` with the reason, and queries use PyTorch for it.
    """
    start = time.perf_counter()
    tolerance = TOLERANCE if tolerance is None else tolerance
    folder = Path(folder)
    staging = folder.parent / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # what a killed export left
    staging.mkdir(parents=True)
    identity = encoder.identity
    towers = query_towers(encoder)
    manifest: dict = {
        "format": FORMAT,
        "digest": identity.get("digest"),
        "identity": identity,
        "embed_dim": int(encoder.embed_dim),
        "tolerance": tolerance,
        "opset": OPSET,
        "exporter": "torch.onnx.export (TorchScript), then onnxruntime extended optimisations, saved",
        "versions": _versions(),
    }
    try:
        for tower, module, reason, export in (
            ("text", towers.text, towers.text_reason, _export_text),
            ("image", towers.image, towers.image_reason, _export_image),
        ):
            if module is None:
                manifest[tower] = {"status": UNAVAILABLE, "reason": reason}
                continue
            try:
                manifest[tower] = export(towers, staging)
            except Exception as error:  # an exporter or runtime failure is a reason to fall back, not to stop
                manifest[tower] = {"status": UNAVAILABLE, "reason": f"export failed: {type(error).__name__}: {error}"}
        runtime = OnnxQueryEncoder(staging, manifest)
        for tower in TOWER_FILES:
            if manifest[tower]["status"] != OK:
                continue
            try:
                diff = _check(encoder, runtime, tower)
            except Exception as error:
                diff, why = float("inf"), f"check failed: {type(error).__name__}: {error}"
            else:
                why = f"max abs diff {diff:.2e} from the PyTorch tower exceeds {tolerance:g}"
            manifest[tower]["max_abs_diff"] = diff if np.isfinite(diff) else None
            if not diff <= tolerance:
                manifest[tower] = {"status": REJECTED, "reason": why, "max_abs_diff": manifest[tower]["max_abs_diff"]}
        del runtime  # its sessions hold the staged files open
        _add_int8(encoder, staging, manifest)
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        manifest["exported_at"] = time.time()
        _publish(staging, folder, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(manifest, time.perf_counter() - start)


def _check_int8(encoder: Encoder, runtime: OnnxQueryEncoder, tower: str) -> float:
    """Worst cosine of ``runtime``'s (int8) vectors to ``encoder``'s on the probes."""
    if tower == "text":
        ours, theirs = encoder.encode_text(PROBE_TEXTS), runtime.encode_text(PROBE_TEXTS)
    else:
        images = probe_images()
        ours = encoder.encode_image(torch.stack([encoder.image_transform(image) for image in images]))
        theirs = runtime.encode_image(np.stack([runtime.image_transform(image) for image in images]))
    ours = ours.detach().cpu().numpy() if hasattr(ours, "detach") else np.asarray(ours)
    return float((ours.astype(np.float64) * theirs.astype(np.float64)).sum(axis=1).min())


def _add_int8(encoder: Encoder, staging: Path, manifest: dict) -> None:
    """Quantize each usable tower to its int8 twin (``vitrina.models.quantize_onnx``), check it, record it."""
    from vitrina.models.quantize_onnx import METHODS, MIN_COSINE, int8_file, quantize_tower

    for tower, name in TOWER_FILES.items():
        if manifest[tower]["status"] != OK:
            continue
        try:
            quantize_tower(staging / name, staging / int8_file(name), tower)
            runtime = OnnxQueryEncoder(staging, {**manifest, tower: {**manifest[tower], "file": int8_file(name)}})
            cosine = _check_int8(encoder, runtime, tower)
            del runtime
        except Exception as error:  # no int8 twin is a reason to run float32, not to stop
            manifest[tower]["int8"] = {"status": UNAVAILABLE, "reason": f"{type(error).__name__}: {error}"}
            continue
        entry = {
            "status": OK,
            "file": int8_file(name),
            "min_cosine": cosine,
            "quantization": METHODS[tower],
        }
        if not cosine >= MIN_COSINE:
            entry.update(status=REJECTED, reason=f"cosine {cosine:.4f} to the PyTorch tower is below {MIN_COSINE}")
        manifest[tower]["int8"] = entry


def _publish(staging: Path, folder: Path, manifest: dict) -> None:
    """Move the staged files of the usable towers into ``folder``; the manifest goes last, stale files after."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).exists():
        (folder / MANIFEST).unlink()  # readers stop using the old files before any is replaced
        fsync_dir(folder)
    keep = []
    for tower, name in TOWER_FILES.items():
        if manifest[tower]["status"] == OK:
            keep += [name + DATA_SUFFIX, name]  # weights before the graph that names them
            if manifest[tower].get("int8", {}).get("status") == OK:
                int8 = manifest[tower]["int8"]["file"]
                keep += [int8 + DATA_SUFFIX, int8]
            if tower == "text":
                keep.append(TOKENIZER_FILE)
    for name in keep:
        staged = staging / name
        if staged.exists():
            atomic_write(folder / name, lambda tmp, staged=staged: os.replace(staged, tmp))
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for path in folder.iterdir():
        if path.name not in keep and path.name != MANIFEST:
            path.unlink(missing_ok=True)
