"""Query texts -> token ids and attention mask with the ``tokenizers`` library alone.

The writer saves the exact tokenizer the PyTorch path runs (our BPE, or the MiniLM tower's WordPiece
taken out of transformers), with its normalisation, special tokens, truncation and padding, so the ids
here are the PyTorch path's ids, not a re-implementation of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class QueryTokenizer:
    """list of B strings -> ``input_ids`` and ``attention_mask``, (B, L) int64 each.

    ``trim_padding``: columns after the longest text's last real token are dropped before a tower runs.
    That never changes a tower's output (a causal text transformer never looks ahead of its end-of-text
    token; a bidirectional one masks the padding out), and a short query then costs a short sequence.
    """

    def __init__(self, tokenizer: Tokenizer, *, trim_padding: bool = True) -> None:
        self.tokenizer = tokenizer
        self.trim_padding = trim_padding

    @classmethod
    def from_file(cls, path: str | Path, *, trim_padding: bool = True) -> QueryTokenizer:
        """Read a ``tokenizer.json`` (padding and truncation as saved in it)."""
        return cls(Tokenizer.from_file(str(path)), trim_padding=trim_padding)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) exactly as the tokenizer pads them: (B, L) int64 each, nothing trimmed."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (B, L)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (B, L)
        return ids, mask

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The tower's inputs: ``input_ids`` and ``attention_mask`` (B, L'), padding trimmed if asked."""
        ids, mask = self.encode(texts)
        if self.trim_padding and mask.size:
            length = max(1, int(mask.sum(axis=1).max()))  # the longest text's real tokens
            ids, mask = ids[:, :length], mask[:, :length]
        return {"input_ids": np.ascontiguousarray(ids), "attention_mask": np.ascontiguousarray(mask)}
