"""Recall on a held-out emoji drawing style: every emoji of the style, queried by its caption and by its name.

The demo indexes one emoji style it never trained on (facebook by default) and keeps a seeded set of concepts
out of training in every style (``vitrina.data.holdout``). This scores a CLIP on that style, text -> image R@K
over the whole style, for two kinds of query: the captions the index holds ("an emoji of a grinning face,
smileys & emotion") and the plain emoji names ("grinning face"). An image is relevant when its caption (name)
is the query, so the several images one name covers all count.

Each kind is split by concept into the parts the demo's choices treat differently:

* ``report_half``: seen concepts no choice ever looked at (the honest headline);
* ``selection_half``: seen concepts the best epoch was chosen by (optimistic);
* ``held_out_concepts``: concepts never trained on, in any style (zero-shot);
* ``all``: the whole style.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vitrina.data.emoji import emoji_caption, load_emoji
from vitrina.data.holdout import selection_split
from vitrina.data.images import load_image
from vitrina.data.sources import EMOJI_CONCEPT, load_training_items
from vitrina.eval.retrieval import first_relevant_rank

KS = (1, 5, 10)
KINDS = ("captions", "names")
PARTS = ("report_half", "selection_half", "held_out_concepts")


class StyleEncoder(Protocol):
    """What scoring needs of an encoder (a ``CLIPEncoder``, or a bare model wrapped to look like one)."""

    image_transform: Callable  # PIL image -> (3, H, W) tensor

    def encode_image(self, pixels: torch.Tensor): ...
    def encode_text(self, texts: list[str]): ...


def image_vectors(encoder: StyleEncoder, paths: Sequence[Path], batch: int = 256) -> np.ndarray:
    """(N, D) unit vectors of the images at ``paths``."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            pixels = torch.stack([encoder.image_transform(load_image(p)) for p in paths[i : i + batch]])
            out.append(torch.as_tensor(encoder.encode_image(pixels)).float().numpy())
    return np.concatenate(out)


def recalls(encoder: StyleEncoder, gallery: np.ndarray, item_keys: list[str], queries: list[str]) -> dict:
    """Text -> image R@K of each distinct query in ``queries`` over ``gallery``; relevant: item key == query."""
    queries = sorted(set(queries))
    if not queries:
        return {}
    with torch.inference_mode():
        text = np.concatenate(
            [
                torch.as_tensor(encoder.encode_text(queries[i : i + 512])).float().numpy()
                for i in range(0, len(queries), 512)
            ]
        )
    keys = np.asarray(item_keys, dtype=object)
    relevant = keys[None, :] == np.asarray(queries, dtype=object)[:, None]  # (Q, N)
    ranks = first_relevant_rank(text @ gallery.T, relevant)
    return {"queries": len(queries), **{f"R@{k}": float(np.mean(ranks < k)) for k in KS}}


def style_recalls(
    encoder: StyleEncoder, held_out_concepts: set[str], seed: int, *, style: str = "facebook"
) -> dict[str, dict]:
    """{kind: {part: {"queries", "R@1", "R@5", "R@10"}}} on ``style`` (module docstring); the selection half
    is the demo's seeded draw over the style's seen concepts (``seed``: the demo's)."""
    items = load_emoji(style)
    concepts = [EMOJI_CONCEPT + item.unified for item in items]
    keys_of = {"captions": [emoji_caption(item) for item in items], "names": [item.name.lower() for item in items]}
    gallery = image_vectors(encoder, [item.path for item in items])
    _, style_concepts = load_training_items(f"emoji:{style}", seed=seed)
    seen = [c for c in style_concepts if c not in held_out_concepts]
    _, _, selection = selection_split(seen, seen, seed=seed)
    part_of = {
        c: "held_out_concepts" if c in held_out_concepts else "selection_half" if c in selection else "report_half"
        for c in concepts
    }
    out: dict[str, dict] = {}
    for kind in KINDS:
        keys = keys_of[kind]
        out[kind] = {"all": recalls(encoder, gallery, keys, keys)}
        for part in PARTS:
            chosen = [k for k, c in zip(keys, concepts, strict=True) if part_of[c] == part]
            out[kind][part] = recalls(encoder, gallery, keys, chosen)
    return out


PART_TITLES = {
    "report_half": "seen, report half",
    "selection_half": "seen, selection half",
    "held_out_concepts": "held-out concepts",
    "all": "the whole style",
}


def format_style_table(results: dict[str, dict], style: str = "facebook") -> str:
    """``style_recalls`` results as a rich table (fits 80 columns), rendered to text."""
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"held-out style: {style} emoji, never trained on (text -> image)",
        caption="report half: seen concepts no choice looked at; selection half: the best epoch was chosen on it; "
        "held-out concepts: never trained on in any style (zero-shot)",
    )
    for column in ("query", "concepts", "queries", *(f"R@{k}" for k in KS)):
        table.add_column(column, justify="left" if column in ("query", "concepts") else "right")
    for kind in KINDS:
        for part in (*PARTS, "all"):
            block = results.get(kind, {}).get(part) or {}
            if not block:
                continue
            recall = (f"{block[f'R@{k}']:.3f}" for k in KS)
            table.add_row(kind if part == PARTS[0] else "", PART_TITLES[part], str(block["queries"]), *recall)
    buffer = io.StringIO()
    Console(file=buffer, width=80, force_terminal=False).print(table)
    return buffer.getvalue()
