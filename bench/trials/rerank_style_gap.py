"""Trial (records nothing; its figures are quoted in bench/notes/rerank.md): can the re-ranker learn the dual
encoder's errors on an emoji style it never saw, when it trains on data where the dual encoder errs the same way?

The frozen CLIP's features are cached for the re-ranker's training data (``--train-data``, less the CLIP's
held-out concepts) and for the facebook style (every concept, one caption per image); a re-ranker
(``vitrina.models.rerank``, the loss of ``vitrina.train.rerank``) is trained for ``--minutes`` and after every
epoch each facebook caption's top 50 dual-encoder images are re-scored: R@1 before and after, over every
caption and over the CLIP's held-out concepts alone. Beside the plain run, two ways to give it realistic errors:

* ``--copies K``: K extra looks of every training image (random crop ``--crop``, colour jitter ``--jitter``
  / ``--hue``, grayscale ``--gray``, light blur), each look a collection of its own (a caption's positive
  and its hard negatives come from the same look, as a query's candidates come from one index);
* ``--clip-styles apple,google``: a CLIP trained now by the demo's recipe (``vitrina.demo.train_demo_clip``)
  on those styles alone (into ``--clip``, when it is not there yet), so that ``--train-data emoji:twitter``
  is a style it never saw.

    python bench/trials/rerank_style_gap.py --clip runs/demo/clip --minutes 4
    python bench/trials/rerank_style_gap.py --clip runs/demo/clip --minutes 6 --copies 3 \\
        --crop 0.5 --jitter 0.4 --hue 0.1 --gray 0.2
    python bench/trials/rerank_style_gap.py --clip runs/demo/clip --minutes 6 --copies 2
    python bench/trials/rerank_style_gap.py --clip runs/explore/clip-apple-google --clip-styles apple,google \\
        --train-data emoji:twitter --minutes 6
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vitrina.checkpoint import best_checkpoint, load_model  # noqa: E402
from vitrina.data.datasets import open_source  # noqa: E402
from vitrina.data.holdout import split_held_out  # noqa: E402
from vitrina.data.sources import load_training_items  # noqa: E402
from vitrina.data.transforms import eval_transform  # noqa: E402
from vitrina.demo import train_demo_clip  # noqa: E402
from vitrina.eval.seen_unseen import held_out_of  # noqa: E402
from vitrina.models.rerank import CrossAttentionReranker, config_for  # noqa: E402
from vitrina.train import rerank as R  # noqa: E402

TEST_STYLE = "facebook"


def add_looks(cache: R.FeatureCache, clip, sources: list, look, copies: int) -> None:
    """Append ``copies`` looks of every image (rows ``k * n + i``) to the cache's image tokens and vectors."""
    size = clip.config.vision.image_size
    normalise = eval_transform(size, clip.config.image_mean, clip.config.image_std)
    images = [open_source(s).resize((size, size)) for s in sources]
    tokens, vectors = [cache.image_tokens], [cache.image_vectors]
    with torch.inference_mode():
        for _ in range(copies):
            for i in range(0, len(images), 256):
                x = clip.image_tokens(torch.stack([normalise(look(im)) for im in images[i : i + 256]]))
                tokens.append(x)
                vectors.append(clip.encode_image_tokens(x))
    cache.image_tokens, cache.image_vectors = torch.cat(tokens), torch.cat(vectors)


def mine_per_look(cache: R.FeatureCache, rows: np.ndarray, settings: R.RerankSettings, looks: int) -> R.Groups:
    """``mine_groups`` within each look (positives and negatives of one look), rows shifted to the look's."""
    n = cache.image_vectors.shape[0] // looks
    parts = []
    for k in range(looks):
        one = copy.copy(cache)
        one.image_vectors = cache.image_vectors[k * n : (k + 1) * n]
        groups = R.mine_groups(one, rows, settings, seed=k)
        parts.append(R.Groups(groups.captions, groups.images + k * n, groups.dual))
    return R.Groups(*(torch.cat([getattr(g, f) for g in parts]) for f in ("captions", "images", "dual")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True, help="a CLIP checkpoint (trained here first with --clip-styles)")
    parser.add_argument("--clip-styles", default=None, help="train the CLIP on these emoji styles when missing")
    parser.add_argument("--clip-minutes", type=float, default=10.0)
    parser.add_argument("--train-data", default="emoji:apple,google,twitter", help="what the re-ranker trains on")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--copies", type=int, default=0)
    parser.add_argument("--crop", type=float, default=0.8, help="smallest share of the area a look keeps")
    parser.add_argument("--jitter", type=float, default=0.2, help="brightness, contrast and saturation jitter")
    parser.add_argument("--hue", type=float, default=0.0)
    parser.add_argument("--gray", type=float, default=0.0, help="probability of a grayscale look")
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = Path(args.clip)
    if args.clip_styles and not (model_dir / "config.json").is_file():
        styles = args.clip_styles.split(",")
        train_demo_clip(model_dir, train_styles=styles, held_out_style=TEST_STYLE, train_minutes=args.clip_minutes)
    model_dir = best_checkpoint(model_dir)
    clip = load_model(model_dir)[0].requires_grad_(False).eval()
    held = set((held_out_of(str(model_dir)) or {}).get("concepts", []))
    pairs, concepts = load_training_items(args.train_data)
    pairs = split_held_out(pairs, concepts, held)[0]
    test_pairs, test_concepts = load_training_items(f"emoji:{TEST_STYLE}")
    cache, test = R.build_cache(clip, pairs), R.build_cache(clip, test_pairs)
    looks = 1 + args.copies
    if args.copies:
        look = T.Compose(
            [
                T.RandomResizedCrop(clip.config.vision.image_size, scale=(args.crop, 1.0), ratio=(0.9, 1.1)),
                T.ColorJitter(args.jitter, args.jitter, args.jitter, args.hue),
                T.RandomGrayscale(args.gray),
                T.RandomApply([T.GaussianBlur(3, (0.1, 1.0))], p=0.3),
            ]
        )
        add_looks(cache, clip, list(dict.fromkeys(source for source, _ in pairs)), look, args.copies)
    rows = np.arange(len(cache.captions))
    n = cache.image_vectors.shape[0] // looks
    for k in range(looks):
        first = (cache.text_vectors @ cache.image_vectors[k * n : (k + 1) * n].T).argmax(dim=1).tolist()
        r1 = np.mean([f in cache.positives[r] for r, f in zip(rows.tolist(), first, strict=True)])
        print(f"training data, look {k}: dual-encoder R@1 over its own images {r1:.3f}")

    held_captions = {c for (_, c), k in zip(test_pairs, test_concepts, strict=True) if k in held}
    everything = R.rerank_eval(test, np.arange(len(test.captions)), 50)
    zero_shot = R.rerank_eval(test, np.array([i for i, c in enumerate(test.captions) if c in held_captions]), 50)
    settings = R.RerankSettings()
    groups = mine_per_look(cache, rows, settings, looks)
    shape = {"width": settings.width, "depth": settings.depth, "heads": settings.heads}
    model = CrossAttentionReranker(config_for(clip, dual_scale=float(clip.scale()), **shape))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loader = torch.utils.data.DataLoader(R.GroupExamples(cache, groups), batch_size=32, shuffle=True)

    def report(epoch: int, seconds: float, loss: float) -> None:
        model.eval()
        with torch.no_grad():
            a, b = everything(model), zero_shot(model)
        print(
            f"epoch {epoch} {seconds:.0f}s loss {loss:.3f}  {TEST_STYLE} R@1 dual {a['val_r1_dual']:.3f} "
            f"re-ranked {a['val_r1_rerank']:.3f}  held-out concepts {b['val_r1_dual']:.3f} -> {b['val_r1_rerank']:.3f}",
            flush=True,
        )

    report(0, 0.0, float("nan"))
    start, epoch = time.monotonic(), 0
    while time.monotonic() - start < args.minutes * 60:
        epoch += 1
        model.train()
        losses = []
        for batch in loader:
            loss = R.group_softmax_step(model, batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if time.monotonic() - start > args.minutes * 60:
                break
        report(epoch, time.monotonic() - start, float(np.mean(losses)))


if __name__ == "__main__":
    main()
