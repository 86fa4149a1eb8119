"""The light query path: a version's text and image towers run in ONNX Runtime, without torch or transformers.

The indexer (the one writer) exports each version's towers into ``INDEX/versions/<N>/towers/`` and checks
them against the PyTorch towers when it does (``vitrina.models.export``); a search reads them here:

    towers      the folder's layout and its manifest, ``towers.json`` (which towers are usable, and why not)
    tokenizer   texts -> token ids and attention mask, as the PyTorch path tokenizes (``tokenizers`` only)
    preprocess  PIL image -> normalised pixels, as ``vitrina.data.transforms.EvalTransform`` (numpy + PIL)
    encoder     ``OnnxQueryEncoder``: ``encode_text`` / ``encode_image`` -> (B, D) float32 unit vectors

Nothing in this package imports torch or transformers, and nothing in it writes a file.
"""

from __future__ import annotations

from vitrina.runtime.encoder import OnnxQueryEncoder, session_options
from vitrina.runtime.preprocess import ImagePreprocess
from vitrina.runtime.tokenizer import QueryTokenizer
from vitrina.runtime.towers import TOWERS_DIR, TowersUnavailable, read_manifest, towers_summary

__all__ = [
    "TOWERS_DIR",
    "ImagePreprocess",
    "OnnxQueryEncoder",
    "QueryTokenizer",
    "TowersUnavailable",
    "read_manifest",
    "session_options",
    "towers_summary",
]
