"""Trial (records nothing; its figures are quoted in bench/notes/rerank.md): does query-bank normalisation
(QB-Norm, Bogolin et al. 2022) lift the dual encoder's R@1 on the emoji style it never saw, and is the lift real?

A *hub* is an image near many queries, ranked high for captions that are not its own. Query-bank
normalisation pulls hubs down with a bank of queries the model was trained on: image ``i`` scores
``s(q, i) - logsumexp_b(beta * s(b, i)) / beta`` over the bank's captions ``b`` (the inverted softmax, "IS"),
or that only when the query's own top-1 image is the top-1 of some bank caption ("DIS", the dynamic
variant; otherwise the plain cosine). One number per image, no training: it would fit the re-ranking step.

The bank: the distinct captions the re-ranker trains on (``--bank``, less the CLIP's held-out concepts).
Queries and relevance as ``bench/rerank.py`` (every distinct caption of the index, its items are those
indexed with exactly it), over the whole index. Columns: the *selection* / *report* halves of the seen
concepts (``vitrina.data.holdout.selection_split``, as the demo picks its checkpoint: ``beta`` may be read off
the selection half, the report half is the honest number) and the CLIP's held-out concepts.

The emoji captions of a concept are the same words in every style, so a bank of the other styles'
captions holds the report half's query texts themselves. The second block drops them from the bank
(``no-overlap``): what is left is what a query the bank has never seen would gain.

The last block asks whether the unseen style is an *offset* that one vector per side removes, with no
query texts at all: the images centred on the index's mean (the style's common direction), the queries on
the ``no-overlap`` bank's mean (the modality gap), both (a fraction ``a`` of the mean subtracted, then
renormalised); and hubs found among the images alone (each image's mean cosine to its ``k`` nearest other
images, weighted by ``w`` and subtracted: the image side of CSLS).

    python bench/trials/rerank_querybank.py --index runs/demo/index-emoji-facebook
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vitrina.data.holdout import selection_split, split_held_out  # noqa: E402
from vitrina.data.sources import load_training_items  # noqa: E402
from vitrina.eval.seen_unseen import held_out_of  # noqa: E402
from vitrina.search import Searcher  # noqa: E402


def bank_penalty(bank_vs_images: np.ndarray, beta: float) -> np.ndarray:
    """(B, N) cosines of the bank's captions to the images -> (N,) each image's hub penalty, in cosine units."""
    return logsumexp(beta * bank_vs_images, axis=0) / beta


def normalised(scores: np.ndarray, bank_vs_images: np.ndarray, beta: float, dynamic: bool) -> np.ndarray:
    """(Q, N) query-image cosines corrected by the bank (IS), or only for queries whose top-1 the bank activates."""
    corrected = scores - bank_penalty(bank_vs_images, beta)[None]
    if not dynamic:
        return corrected
    activated = np.zeros(scores.shape[1], dtype=bool)
    activated[np.argmax(bank_vs_images, axis=1)] = True  # the images that are some bank caption's top-1
    return np.where(activated[np.argmax(scores, axis=1)][:, None], corrected, scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="runs/demo/index-emoji-facebook")
    parser.add_argument("--style", default="facebook", help="the index's emoji style (for the concept halves)")
    parser.add_argument("--bank", default="emoji:apple,google,twitter", help="whose captions make the bank")
    parser.add_argument("--betas", default="10,20,30")
    args = parser.parse_args()

    with Searcher(Path(args.index), runtime="torch") as searcher:
        model_ref = searcher.served.version.model_ref
        ids, vectors = searcher.store.all_vectors()
        caption_of = {item_id: caption for item_id, _, _, caption in searcher.store.items()}
        item_captions = np.asarray([caption_of.get(int(i)) for i in ids], dtype=object)  # aligned with vectors
        captions = sorted({c for c in caption_of.values() if c})
        held = held_out_of(model_ref) or {}
        held_concepts, held_captions = set(held.get("concepts", [])), set(held.get("captions", []))
        style_pairs, style_concepts = load_training_items(f"emoji:{args.style}")
        concept_of = {caption: concept for (_, caption), concept in zip(style_pairs, style_concepts, strict=True)}
        seen = [(p, c) for p, c in zip(style_pairs, style_concepts, strict=True) if c not in held_concepts]
        _, _, selection_concepts = selection_split([p for p, _ in seen], [c for _, c in seen], seed=0)
        bank_pairs, bank_concepts = load_training_items(args.bank)
        bank_captions = sorted({caption for _, caption in split_held_out(bank_pairs, bank_concepts, held_concepts)[0]})

        unseen = np.asarray([c in held_captions for c in captions])
        selection = np.asarray([concept_of.get(c) in selection_concepts for c in captions]) & ~unseen
        report = ~selection & ~unseen
        report_texts = {c for c, r in zip(captions, report, strict=True) if r}
        banks = {"bank": bank_captions, "no-overlap": [c for c in bank_captions if c not in report_texts]}
        texts = searcher.text_vectors(sorted(set(captions) | set(bank_captions)))
    queries = np.stack([texts[c] for c in captions]).astype(np.float32)
    images = vectors.astype(np.float32)
    scores = queries @ images.T
    # an item is relevant to the caption it was indexed with (as bench/rerank.py counts it)
    is_relevant = item_captions[None, :] == np.asarray(captions, dtype=object)[:, None]  # (Q, N)

    def line(name: str, ranked: np.ndarray) -> str:
        # argsort order, as FAISS ranks: ties do not count in a query's favour (first_relevant_rank of
        # vitrina.eval.retrieval counts them so, and reads report R@1 0.3190 where this reads 0.3154)
        top5 = np.take_along_axis(is_relevant, np.argsort(-ranked, axis=1)[:, :5], 1)
        r1, r5 = top5[:, 0], top5.any(1)
        return (
            f"{name:24s} selection R@1 {r1[selection].mean():.4f} | report R@1 {r1[report].mean():.4f} "
            f"R@5 {r5[report].mean():.4f} | held-out R@1 {r1[unseen].mean():.4f} | all R@1 {r1.mean():.4f}"
        )

    print(f"{len(captions)} queries: selection {selection.sum()}, report {report.sum()}, held-out {unseen.sum()}")
    print(line("cosine", scores))
    for name, bank in banks.items():
        bank_vs_images = np.stack([texts[c] for c in bank]).astype(np.float32) @ images.T
        print(f"-- {name}: {len(bank)} captions")
        for beta in (float(b) for b in args.betas.split(",")):
            for dynamic in (False, True):
                label = f"{'DIS' if dynamic else 'IS'} beta {beta:g}"
                print(line(label, normalised(scores, bank_vs_images, beta, dynamic)))

    print("-- centring and image-side hubs")
    image_mean = images.mean(0, keepdims=True)
    text_mean = np.stack([texts[c] for c in banks["no-overlap"]]).astype(np.float32).mean(0, keepdims=True)
    for a in (0.5, 1.0):
        centred_images, centred_queries = unit(images - a * image_mean), unit(queries - a * text_mean)
        print(line(f"images centred a {a:g}", queries @ centred_images.T))
        print(line(f"queries centred a {a:g}", centred_queries @ images.T))
        print(line(f"both centred a {a:g}", centred_queries @ centred_images.T))
    image_vs_images = images @ images.T
    np.fill_diagonal(image_vs_images, -1.0)  # an image is not its own neighbour
    for k in (10, 50):
        hubness = np.sort(image_vs_images, axis=1)[:, -k:].mean(1)
        for w in (0.25, 0.5):
            print(line(f"image hubs k {k} w {w:g}", scores - w * hubness[None]))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


if __name__ == "__main__":
    main()
