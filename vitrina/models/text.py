"""Text side of our CLIP: a byte-level BPE tokenizer and a causal text transformer.

Tokenizer (built with the ``tokenizers`` library, saved as ``tokenizer.json``):

* normalisation: Unicode NFC, lower case, runs of whitespace collapsed to one space, ends stripped.
  ``decode(encode(t)) == normalize_text(t)`` for any text that fits the context;
* byte-level pre-tokenisation, so every string is encodable (no unknown token);
* ``<|startoftext|> ... <|endoftext|>``, padded with ``<|pad|>`` to ``context_length``; a text that
  is too long is cut *before* the end-of-text token, which is always kept (it is what we pool).

``byte_level_tokenizer()`` needs no training (256 byte symbols + 3 special tokens, no merges): it is
what an untrained preset uses. ``train_bpe(captions, vocab_size)`` learns merges from captions.

Text transformer (as in CLIP): token + learned position embedding, pre-norm blocks with a causal
mask, final LayerNorm, and the features of the end-of-text position as the sentence vector.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn

from vitrina.models.vit import Block, init_transformer_weights

SOT, EOT, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [SOT, EOT, PAD]  # ids 0, 1, 2 in every tokenizer built here
DEFAULT_CONTEXT_LENGTH = 77

# --- tokenizer ------------------------------------------------------------------------------


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [normalizers.NFC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )


def _finish(tokenizer: Tokenizer, context_length: int) -> Tokenizer:
    """Add normaliser, byte-level pre-tokeniser/decoder, SOT/EOT template, truncation and padding."""
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    sot, eot = tokenizer.token_to_id(SOT), tokenizer.token_to_id(EOT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)]
    )
    return set_context_length(tokenizer, context_length)


def set_context_length(tokenizer: Tokenizer, context_length: int) -> Tokenizer:
    """Pad and truncate every encoding to ``context_length`` tokens (SOT and EOT included).

    Pads with ``<|pad|>``; a tokenizer without it (a pretrained CLIP's) keeps the pad token it was
    saved with, else pads with ``<|endoftext|>`` as OpenAI's CLIP does. Padding never changes the
    features: the attention mask marks it and the causal mask keeps it away from the pooled token.
    """
    if context_length < 3:
        raise ValueError(f"context_length must be at least 3 (SOT, one token, EOT), got {context_length}")
    # Truncation leaves room for the template's SOT/EOT, so EOT survives truncation.
    tokenizer.enable_truncation(max_length=context_length)
    pad = PAD
    if tokenizer.token_to_id(PAD) is None:
        pad = (tokenizer.padding or {}).get("pad_token") or EOT
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"the tokenizer has neither {PAD} nor {EOT} to pad with")
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad, length=context_length)
    return tokenizer


def byte_level_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """An untrained byte-level BPE: 3 special tokens + the 256 byte symbols, no merges (vocab 259)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return _finish(tokenizer, context_length)


def train_bpe(texts: Iterable[str], vocab_size: int, *, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """Learn a byte-level BPE of at most ``vocab_size`` tokens (specials and 256 bytes included) from ``texts``."""
    if vocab_size < 259:
        raise ValueError(f"vocab_size must be at least 259 (3 special tokens + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _finish(tokenizer, context_length)


def load_tokenizer(path: str, *, context_length: int | None = None) -> Tokenizer:
    """Read a ``tokenizer.json``; ``context_length`` re-sets padding/truncation when given."""
    tokenizer = Tokenizer.from_file(str(path))
    return set_context_length(tokenizer, context_length) if context_length else tokenizer


def normalize_text(tokenizer: Tokenizer, text: str) -> str:
    """The text as the tokenizer sees it (what ``decode(encode(text))`` gives back)."""
    return tokenizer.normalizer.normalize_str(text)


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """list of B strings -> ``input_ids`` and ``attention_mask``, both (B, context_length) int64."""
    encodings = tokenizer.encode_batch(list(texts))
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
    }


def decode(tokenizer: Tokenizer, ids: list[int] | torch.Tensor) -> str:
    """Token ids (one text) -> string, special tokens dropped."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return tokenizer.decode(ids, skip_special_tokens=True)


# --- text transformer -----------------------------------------------------------------------


EosPooling = Literal["mask", "argmax", "token"]


@dataclass
class TextConfig:
    """Shape of the CLIP text transformer; ``vocab_size`` may exceed the tokenizer's (rows unused).

    ``eos_pooling`` says where the sentence vector is read: ``"mask"`` (ours) the last position the
    attention mask marks real; ``"argmax"`` the position of the largest id (OpenAI's CLIP, where
    end-of-text is the last id of the vocabulary); ``"token"`` the first position holding
    ``eos_token_id`` (newer Hugging Face checkpoints). On tokenizer output all three agree.
    """

    vocab_size: int = 259
    context_length: int = DEFAULT_CONTEXT_LENGTH
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5
    act: Literal["gelu", "quick_gelu"] = "gelu"  # MLP activation; OpenAI's CLIP uses quick_gelu
    eos_pooling: EosPooling = "mask"
    eos_token_id: int | None = None  # needed by eos_pooling "token"

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        if self.eos_pooling not in ("mask", "argmax", "token"):
            raise ValueError(f"eos_pooling must be 'mask', 'argmax' or 'token', got {self.eos_pooling!r}")
        if self.eos_pooling == "token" and self.eos_token_id is None:
            raise ValueError("eos_pooling 'token' needs eos_token_id")


class TextTransformer(nn.Module):
    """Token ids (B, L) -> sentence features (B, width), taken at each text's end-of-text token."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(torch.zeros(c.context_length, c.width))
        self.blocks = nn.ModuleList(
            Block(width=c.width, heads=c.heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, eps=c.layer_norm_eps, act=c.act)
            for _ in range(c.depth)
        )
        self.ln_final = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.reset_parameters()

    @property
    def width(self) -> int:
        return self.config.width

    def reset_parameters(self) -> None:
        """CLIP's init for the embeddings (std 0.02 / 0.01), timm-style for the linear layers."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.apply(init_transformer_weights)

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask (1 = real token; EOT is the last real one) -> (B, width)."""
        eot = self.eos_positions(input_ids, attention_mask)  # (B,)
        if torch.onnx.is_in_onnx_export():
            # An exported graph must not bake in one batch's length: it runs on the columns it is given
            # (the query runtime trims the padding itself, vitrina.runtime.tokenizer).
            length = input_ids.shape[1]
        else:
            # The mask is causal, so padding after EOT never reaches it: drop the all-padding tail.
            length = int(eot.max()) + 1
            if length > self.config.context_length:
                raise ValueError(f"{length} tokens exceed the text context length {self.config.context_length}")
        x = self._states(input_ids[:, :length])  # (B, L, C)
        return x[torch.arange(x.shape[0], device=x.device), eot]  # (B, C)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, C): every token's state after the final LayerNorm (for the re-ranker).

        Attention is causal, so the padding after a text's EOT changes none of its real tokens' states;
        the mask says which rows are real.
        """
        if input_ids.shape[1] > self.config.context_length:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the text context length {self.config.context_length}")
        return self._states(input_ids)

    def _states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, C) causal transformer states after ``ln_final``."""
        L = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:L]  # (B, L, C)
        for block in self.blocks:
            x = block(x, is_causal=True)
        return self.ln_final(x)

    def eos_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B,) index of each text's end-of-text token (see ``TextConfig``)."""
        if self.config.eos_pooling == "argmax":
            return input_ids.argmax(dim=1)  # the first of equal maxima, as torch promises
        if self.config.eos_pooling == "token":
            return (input_ids == self.config.eos_token_id).int().argmax(dim=1)  # first EOT
        return attention_mask.sum(dim=1) - 1
