"""A bare contrastive reference for `vitrina train clip` (issue 13): what a step should buy.

The recipe, in one file and its own loop: the demo's 48 px ViT (``VIT_DEMO_48``: width 192, depth 6) from
scratch, frozen all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised, as sentence-transformers
gives them) of each caption computed once, a linear map on each side into 256 dimensions, a symmetric InfoNCE
loss with duplicate-aware targets (one emoji drawn in several styles in a batch is not its own negative),
horizontal flips only, AdamW (torch's defaults but ``--lr``), a fixed temperature, a constant learning rate,
batches drawn from a fresh permutation every epoch.

Scored on the held-out style (facebook emoji) by ``vitrina.eval.style.style_recalls``: the whole style
with plain-name queries (the issue's number: ``names all``) and the report half of vitrina's protocol, with
captions and names. ``--score MODEL_DIR`` scores a vitrina checkpoint the same way, so a trainer run and this
script compare like with like at equal steps.

``--arms`` runs several recipes in turn in one process (the images decoded once), each one difference from the
reference, to bisect what the trainer does differently at equal steps: ``crop`` (the trainer's random resized
crops), ``captions`` (the index captions, "an emoji of a grinning face, smileys & emotion", instead of names),
``variants`` (every phrasing of ``emoji_captions``, one pair each), ``learn-temp``, ``trainer-optim`` (weight
decay 0.1 on matrices only, betas 0.9/0.98, eps 1e-6, gradient clipping at 1, 5% warm-up then a cosine to 0);
``trainer`` is ``train_clip`` itself (``clip-minilm``, ``emoji:STYLES``, ``--trainer-text``) for the whole
epochs nearest ``--steps``. ``--raw-text`` drops the L2 normalisation of the sentence features, as the trainer
does: a per-caption scale, which the bias-free linear map and the L2 normalisation after it remove from the
embedding (only the gradients' weighting changes).

    .venv/bin/python bench/clip_reference.py --steps 120 --eval-at 60 --arms reference,crop,captions,trainer
    .venv/bin/python bench/clip_reference.py --score runs/clip-emoji

Prints one JSON line per evaluation; records nothing (the numbers are comparisons for one run at a time).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vitrina.data.batch_augment import BatchAugment  # noqa: E402
from vitrina.data.emoji import emoji_caption, emoji_captions, load_emoji  # noqa: E402
from vitrina.data.memory import decode_all  # noqa: E402
from vitrina.data.transforms import EvalTransform  # noqa: E402
from vitrina.eval.style import style_recalls  # noqa: E402
from vitrina.models.minilm import MiniLMTower  # noqa: E402
from vitrina.models.registry import VIT_DEMO_48  # noqa: E402
from vitrina.models.vit import ViT  # noqa: E402

MEAN = STD = (0.5, 0.5, 0.5)
EMBED_DIM = 256


class SentenceFeatures:
    """Frozen MiniLM: texts -> (N, 384) sentence features, each distinct text computed once."""

    def __init__(self, *, normalise: bool = True) -> None:
        self.tower, self.normalise, self.memo = MiniLMTower(locked=True), normalise, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        with torch.inference_mode():
            for i in range(0, len(todo), 256):
                chunk = todo[i : i + 256]
                features = self.tower(**self.tower.tokenize(chunk))  # (b, 384)
                if self.normalise:
                    features = F.normalize(features, dim=-1)
                self.memo.update(zip(chunk, features.clone(), strict=True))
        return torch.stack([self.memo[t] for t in texts])  # (N, 384)


class BareClip(nn.Module):
    """ViT -> linear -> unit vector; sentence feature -> linear -> unit vector; a temperature."""

    def __init__(self, *, learn_temp: bool, temperature: float) -> None:
        super().__init__()
        self.vit = ViT(VIT_DEMO_48)
        self.image_map = nn.Linear(VIT_DEMO_48.width, EMBED_DIM, bias=False)
        self.text_map = nn.Linear(384, EMBED_DIM, bias=False)
        log_scale = torch.tensor(math.log(1 / temperature))
        self.log_scale = nn.Parameter(log_scale) if learn_temp else nn.Buffer(log_scale)

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 48, 48) -> (B, D) unit vectors."""
        return F.normalize(self.image_map(self.vit(pixels)), dim=-1)

    def texts(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 384) -> (B, D) unit vectors."""
        return F.normalize(self.text_map(features), dim=-1)


def info_nce(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; the target of row i is spread evenly over the columns of its concept."""
    logits = scale * images @ texts.T  # (B, B)
    same = (concepts[:, None] == concepts[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


class Scorer:
    """What ``style_recalls`` needs of an encoder, over a ``BareClip``."""

    def __init__(self, model: BareClip, text: SentenceFeatures) -> None:
        self.model, self.text = model, text
        self.image_transform = EvalTransform(VIT_DEMO_48.image_size, MEAN, STD)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.images(pixels)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.texts(self.text(list(texts)))


def training_items(styles: str, text: str) -> tuple[list[Path], list[str], list[str]]:
    """(image paths, caption, concept key) per pair of the training styles."""
    paths, captions, concepts = [], [], []
    for style in styles.split(","):
        for item in load_emoji(style):
            if text == "names":
                options = [item.name.lower()]
            elif text == "captions":
                options = [emoji_caption(item)]
            else:
                options = emoji_captions(item)
            for caption in options:
                paths.append(item.path)
                captions.append(caption)
                concepts.append(item.unified)
    return paths, captions, concepts


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """Constant, or the trainer's 5% linear warm-up then a cosine to 0 over ``steps``."""
    if schedule == "constant":
        return 1.0
    warmup = round(0.05 * steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_for(model: BareClip, args: argparse.Namespace) -> torch.optim.Optimizer:
    """torch's AdamW with its defaults, or (``--trainer-optim``) the trainer's settings and groups."""
    if not args.trainer_optim:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    keep = [p for n, p in model.named_parameters() if p.requires_grad and not any(p is q for q in decay)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def summary(quality: dict) -> dict:
    """The numbers compared: names over the whole style (the issue's), and the report half of both kinds."""
    return {
        "names all R@1": quality["names"]["all"]["R@1"],
        "names all R@10": quality["names"]["all"]["R@10"],
        "names report R@10": quality["names"]["report_half"]["R@10"],
        "captions report R@10": quality["captions"]["report_half"]["R@10"],
        "captions all R@10": quality["captions"]["all"]["R@10"],
    }


ARMS = {
    # name: (caption kind, recipe changes) -- each arm one difference from the reference, or the trainer itself
    "reference": ("names", {}),
    "crop": ("names", {"crop": True}),
    "captions": ("captions", {}),
    "variants": ("variants", {}),
    "learn-temp": ("names", {"learn_temp": True}),
    "trainer-optim": ("names", {"trainer_optim": True, "schedule": "cosine"}),
}


class Pixels:
    """Every training image decoded once (uint8, as the trainer decodes them), shared by the arms."""

    def __init__(self) -> None:
        self.row: dict[Path, int] = {}
        self.pixels = torch.empty(0, 3, VIT_DEMO_48.image_size, VIT_DEMO_48.image_size, dtype=torch.uint8)

    def __call__(self, paths: list[Path]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(paths) if p not in self.row]
        if todo:
            decoded, kept = decode_all(todo, VIT_DEMO_48.image_size)  # (n, 3, 48, 48) uint8
            if len(kept) != len(todo):
                raise SystemExit("some emoji images cannot be read; see the warnings")
            self.row.update({p: len(self.row) + i for i, p in enumerate(todo)})
            self.pixels = torch.cat([self.pixels, decoded])
        return self.pixels[[self.row[p] for p in paths]]  # (N, 3, 48, 48)


def run_arm(arm: str, args: argparse.Namespace, pixel_store: Pixels, text: SentenceFeatures) -> None:
    """Train one arm of the reference for ``args.steps`` steps, scoring at ``args.eval_at``."""
    kind, changes = ARMS[arm]
    recipe = argparse.Namespace(**{**vars(args), "crop": False, "learn_temp": False, "trainer_optim": False,
                                   "schedule": "constant", **changes})  # fmt: skip
    torch.manual_seed(args.seed)
    paths, captions, concept_keys = training_items(args.styles, kind)
    pixels = pixel_store(paths)  # (N, 3, 48, 48) uint8
    ids = {c: i for i, c in enumerate(dict.fromkeys(concept_keys))}
    concepts = torch.tensor([ids[c] for c in concept_keys])  # (N,)
    features = text(captions)  # (N, 384), computed once
    model = BareClip(learn_temp=recipe.learn_temp, temperature=args.temperature)
    optimizer = optimizer_for(model, recipe)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    crop = BatchAugment(mean=MEAN, std=STD) if recipe.crop else None
    normalise = EvalTransform(VIT_DEMO_48.image_size, MEAN, STD).normalize
    eval_at = sorted({int(s) for s in args.eval_at.split(",") if s} | {args.steps})
    generator = torch.Generator().manual_seed(args.seed)
    order, step, started = torch.empty(0, dtype=torch.long), 0, time.monotonic()
    while step < args.steps:
        if len(order) < args.batch_size:  # a fresh permutation per epoch; the last partial batch is dropped
            order = torch.randperm(len(captions), generator=generator)
        batch, order = order[: args.batch_size], order[args.batch_size :]
        if crop is not None:
            x = crop(pixels[batch])
        else:
            flip = torch.rand(len(batch)) < 0.5
            x = pixels[batch]
            x = normalise(torch.where(flip[:, None, None, None], x.flip(-1), x))  # (B, 3, 48, 48)
        model.train()
        loss = info_nce(model.images(x), model.texts(features[batch]), model.log_scale.exp(), concepts[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.trainer_optim:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * lr_factor(step, args.steps, recipe.schedule)
        optimizer.step()
        step += 1
        if step % 10 == 0:
            print(json.dumps({"arm": arm, "step": step, "loss": round(loss.item(), 4)}), flush=True)
        if step in eval_at:
            model.eval()
            with torch.inference_mode():
                quality = style_recalls(Scorer(model, text), set(), args.seed)
            row = {"arm": arm, "step": step, "minutes": round((time.monotonic() - started) / 60, 2)}
            print(json.dumps({**row, **summary(quality)}), flush=True)


def run_trainer(args: argparse.Namespace, out: Path) -> None:
    """The trainer itself (``train_clip``, ``clip-minilm``) on the same styles, batch and learning rate, for the
    whole epochs nearest ``args.steps``; scores its last checkpoint."""
    from vitrina.checkpoint import load_encoder
    from vitrina.config import TrainConfig
    from vitrina.data.sources import load_training_items
    from vitrina.models.registry import build_model
    from vitrina.train.clip import split_pairs, train_clip

    phrasing = "" if args.trainer_text == "captions" else f":{args.trainer_text}"
    pairs, concepts = load_training_items(f"emoji:{args.styles}{phrasing}", seed=args.seed)
    config = TrainConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed, epochs=1)
    per_epoch = len(split_pairs(pairs, config.val_fraction, args.seed)[0]) // args.batch_size
    config.epochs = max(1, round(args.steps / per_epoch))
    if out.exists():
        shutil.rmtree(out)
    summary_ = train_clip(
        model=build_model("clip-minilm"), pairs=pairs, concepts=concepts, out_dir=out, train_config=config,
        progress=False,
    )  # fmt: skip
    quality = style_recalls(load_encoder(str(out)), set(), args.seed)
    arm = f"trainer ({args.trainer_text})"
    print(json.dumps({"arm": arm, "step": summary_.steps, **summary(quality)}), flush=True)


def train(args: argparse.Namespace) -> None:
    pixel_store, text = Pixels(), SentenceFeatures(normalise=not args.raw_text)
    for arm in args.arms.split(","):
        if arm == "trainer":
            run_trainer(args, Path(args.out))
        else:
            run_arm(arm, args, pixel_store, text)


def score(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import load_encoder
    from vitrina.eval.seen_unseen import held_out_of

    held = set((held_out_of(args.score) or {}).get("concepts", []))
    quality = style_recalls(load_encoder(args.score), held, args.seed)
    print(json.dumps({"model": args.score, **summary(quality)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-at", default="", help="comma-separated steps to score at besides the last")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--styles", default="apple,google,twitter")
    parser.add_argument("--text", choices=["names", "captions", "variants"], default="names")
    parser.add_argument("--arms", default="reference", help=f"comma-separated, run in turn: {', '.join(ARMS)}, trainer")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--raw-text", action="store_true", help="sentence features without L2 normalisation")
    parser.add_argument("--trainer-text", choices=["names", "captions", "variants"], default="captions")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "clip-reference"), help="the trainer arm's run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score", metavar="MODEL_DIR", help="only score this vitrina checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    score(args) if args.score else train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
