"""Offline data sources on tiny fixtures written here (IDX, emoji, Open Clip Art), prompts, datasets,
the --data spec; plus checks on the real installed data, skipped when it is absent."""

from __future__ import annotations

import gzip
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrina.data import fashion_mnist as fm
from vitrina.data.datasets import ImageCaptionDataset, LabelledImageDataset
from vitrina.data.emoji import emoji_caption, emoji_captions, export_emoji, load_emoji
from vitrina.data.folder import scan_collection
from vitrina.data.openclipart import clean_title, load_openclipart, read_svg_metadata
from vitrina.data.prompts import PROMPT_TEMPLATES, caption_from_label, fill_template, prompts_for
from vitrina.data.sources import load_training_items, load_training_pairs
from vitrina.data.transforms import eval_transform
from vitrina.errors import UserError

# ---------------------------------------------------------------- Fashion-MNIST (IDX)


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, *, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    blobs = {
        "images-idx3": struct.pack(">IIII", fm.IMAGES_MAGIC, n, rows, cols) + images.tobytes(),
        "labels-idx1": struct.pack(">II", fm.LABELS_MAGIC, n) + labels.astype(np.uint8).tobytes(),
    }
    for kind, blob in blobs.items():
        name = folder / f"{prefix}-{kind}-ubyte"
        if gz:
            with gzip.open(f"{name}.gz", "wb") as f:
                f.write(blob)
        else:
            name.write_bytes(blob)


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    _write_idx(tmp_path / "fashion-mnist", "t10k", images, labels)
    _write_idx(tmp_path / "fashion-mnist", "train", images[:20], labels[:20], gz=False)
    return tmp_path / "fashion-mnist", images, labels


def test_idx_round_trip(tiny_fashion) -> None:
    root, images, labels = tiny_fashion
    x, y = fm.load_fashion_mnist("test", root)
    assert x.shape == (30, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    x, y = fm.load_fashion_mnist("train", root)  # plain (not gzipped) files work too
    assert x.shape == (20, 28, 28)


def test_idx_bad_magic_and_size(tmp_path: Path) -> None:
    p = tmp_path / "bad-images-idx3-ubyte"
    p.write_bytes(struct.pack(">IIII", 2049, 1, 2, 2) + bytes(4))
    with pytest.raises(UserError, match="magic number 2049, expected 2051"):
        fm.read_idx(p, fm.IMAGES_MAGIC)
    p.write_bytes(struct.pack(">IIII", 2051, 2, 2, 2) + bytes(5))  # header says 8 bytes follow
    with pytest.raises(UserError, match="promises 8 data bytes"):
        fm.read_idx(p, fm.IMAGES_MAGIC)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match="too short"):
        fm.read_idx(p, fm.LABELS_MAGIC)


def test_fashion_missing_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist("test", tmp_path)
    with pytest.raises(UserError, match="train' or 'test"):
        fm.load_fashion_mnist("val", tmp_path)  # type: ignore[arg-type]


def test_export_fashion_mnist(tiny_fashion, tmp_path: Path) -> None:
    root, images, labels = tiny_fashion
    out = tmp_path / "out"
    assert fm.export_fashion_mnist("test", out, limit=12, root=root) == 12
    entries = scan_collection(out)
    assert len(entries) == 12
    assert Counter(e.label for e in entries)["ankle boot"] == 1  # index 9
    first = next(e for e in entries if e.path.name == "00000.png")
    assert first.label == "t-shirt"
    assert np.array_equal(np.asarray(Image.open(first.path)), images[0])
    mtime = first.path.stat().st_mtime_ns
    fm.export_fashion_mnist("test", out, limit=12, root=root)  # second call keeps existing files
    assert first.path.stat().st_mtime_ns == mtime
    assert len(fm.FASHION_MNIST_CLASSES) == len(fm.FASHION_MNIST_PROMPT_NAMES) == 10


# ---------------------------------------------------------------- emoji


def _png(path: Path, color=(200, 30, 30, 255)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (8, 8), color).save(path)


@pytest.fixture
def tiny_emoji(tmp_path: Path) -> Path:
    root = tmp_path / "emoji"
    entries = [
        {"name": "GRINNING FACE", "unified": "1F600", "short_name": "grinning", "short_names": ["grinning"],
         "image": "1f600.png", "category": "Smileys & Emotion", "subcategory": "face-smiling",
         "has_img_apple": True, "has_img_google": True},
        {"name": None, "unified": "1F1EA-1F1EC", "short_name": "flag-eg", "short_names": ["flag-eg"],
         "image": "1f1ea-1f1ec.png", "category": "Flags", "subcategory": "country-flag",
         "has_img_apple": True, "has_img_google": False},
        {"name": "THUMBS UP SIGN", "unified": "1F44D", "short_name": "+1", "short_names": ["+1", "thumbsup"],
         "image": "1f44d.png", "category": "People & Body", "subcategory": "hand-fingers-closed",
         "has_img_apple": True, "has_img_google": True,
         "skin_variations": {"1F3FF": {"unified": "1F44D-1F3FF", "image": "1f44d-1f3ff.png",
                                       "has_img_apple": True, "has_img_google": True}}},
        {"name": "GHOST", "unified": "1F47B", "short_name": "ghost", "short_names": ["ghost"],
         "image": "1f47b.png", "category": "Smileys & Emotion", "subcategory": "costume",
         "has_img_apple": True},  # flagged but its file is missing: skipped
    ]  # fmt: skip
    root.mkdir()
    (root / "emoji.json").write_text(json.dumps(entries))
    for style in ("apple", "google"):
        for name in ("1f600.png", "1f1ea-1f1ec.png", "1f44d.png", "1f44d-1f3ff.png"):
            _png(root / "img" / style / "64" / name)
    base = [
        {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin", "happy", "smile"]},
        {"label": "thumbs up", "hexcode": "1F44D", "tags": ["+1", "hand", "thumb", "up", "yes"]},
    ]
    (root / "emojibase").mkdir()
    (root / "emojibase" / "data.json").write_text(json.dumps(base))
    return root


def test_load_emoji_filters_and_names(tiny_emoji: Path) -> None:
    apple = load_emoji("apple", tiny_emoji)
    assert [i.name for i in apple] == ["grinning face", "flag eg", "thumbs up sign"]
    assert apple[0].keywords == ("face", "grin", "happy", "smile") and apple[0].label == "grinning face"
    assert apple[1].label is None and apple[1].keywords == ()
    google = load_emoji("google", tiny_emoji)
    assert [i.name for i in google] == ["grinning face", "thumbs up sign"]  # has_img_google false
    skins = load_emoji("google", tiny_emoji, include_skin_variations=True)
    assert skins[-1].name == "thumbs up sign, dark skin tone" and skins[-1].path.name == "1f44d-1f3ff.png"


def test_emoji_captions(tiny_emoji: Path) -> None:
    grin, flag, thumbs = load_emoji("apple", tiny_emoji)
    assert emoji_caption(grin) == "an emoji of a grinning face, smileys & emotion"
    assert emoji_caption(thumbs) == "an emoji of a thumbs up, people & body"  # CLDR label preferred
    variants = emoji_captions(thumbs)
    assert "thumbs up sign emoji" in variants
    assert {"thumbs up sign", "thumbs up"} <= set(variants)  # the bare name and label: what a search box gets
    assert variants[-1] == "an emoji of a thumbs up: +1, hand, thumb, yes"  # keywords not in the name
    assert len(set(variants)) == len(variants)
    assert emoji_caption(flag) == "an emoji of a flag eg, flags"


def test_emoji_missing_and_bad_style(tmp_path: Path, tiny_emoji: Path) -> None:
    with pytest.raises(UserError, match="make setup"):
        load_emoji("apple", tmp_path / "nothing")
    with pytest.raises(UserError, match="twitter"):
        load_emoji("twitter", tiny_emoji)  # style not fetched
    with pytest.raises(UserError, match="choose from"):
        load_emoji("windows", tiny_emoji)


def test_export_emoji_is_a_captioned_collection(tiny_emoji: Path, tmp_path: Path) -> None:
    out = tmp_path / "held-out"
    assert export_emoji("google", out, root=tiny_emoji) == 2
    entries = scan_collection(out)
    assert [(e.label, e.caption) for e in entries] == [
        ("people and body", "an emoji of a thumbs up, people & body"),
        ("smileys and emotion", "an emoji of a grinning face, smileys & emotion"),
    ]


# ---------------------------------------------------------------- Open Clip Art

_SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <metadata><rdf:RDF><cc:Work rdf:about="">
  <dc:title>{title}</dc:title><dc:description>{description}</dc:description>
  <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
  <dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>
 </cc:Work></rdf:RDF></metadata>
 <rect width="10" height="10"/>
</svg>"""

_ENTITY_SVG = """<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY ns_flows "http://ns.adobe.com/Flows/1.0/"><!ENTITY a "&ns_flows;&ns_flows;">]>
<svg xmlns="http://www.w3.org/2000/svg"><title>&a;</title></svg>"""


def _clip(root: Path, rel: str, title: str, keywords=(), description: str = "", svg: str = "") -> None:
    _png(root / "png" / rel)
    target = (root / "svg" / rel).with_suffix(".svg")
    target.parent.mkdir(parents=True, exist_ok=True)
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    target.write_text(svg or _SVG.format(title=title, description=description, keywords=lis))


@pytest.fixture
def tiny_clipart(tmp_path: Path) -> Path:
    root = tmp_path / "openclipart"
    _clip(root, "food/fruit/apple_pie_01.png", "Apple Pie", ["food", "dessert", "hash", "unsorted", "pie"])
    _clip(root, "food/desserts/apple_pie_01.png", "Apple Pie", ["food", "dessert"])  # same picture again
    flat_icon = "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)"
    _clip(root, "computer/icons/flat-theme/action/delete_user.png", flat_icon, ["hash", "computer", "icons"])
    _clip(root, "animals/dog_jon_01.png", "Dog", ["animal", "pet"], description="A happy dog.")
    _clip(root, "computer/floppy_frederic_moser_01.png", "", svg=_ENTITY_SVG)
    return root


def test_svg_metadata_is_parsed_safely(tiny_clipart: Path) -> None:
    meta = read_svg_metadata(tiny_clipart / "svg/animals/dog_jon_01.svg")
    assert (meta.title, meta.description, meta.keywords) == ("Dog", "A happy dog.", ("animal", "pet"))
    # entity declarations (a billion-laughs shape) are refused, not expanded: empty metadata
    assert read_svg_metadata(tiny_clipart / "svg/computer/floppy_frederic_moser_01.svg").title == ""
    assert clean_title("Clipart by Nicu Buculei - arrow08_4") == "arrow08 4"
    assert clean_title("Lemon SVG theme") == "" and clean_title("gramastar", shared_by=1375) == ""


def test_load_openclipart(tiny_clipart: Path) -> None:
    entries = load_openclipart(tiny_clipart)
    got = {e.path.relative_to(tiny_clipart / "png").as_posix(): (e.label, e.caption) for e in entries}
    assert got == {
        "animals/dog_jon_01.png": ("animals", "clip art of Dog, animals: animal, pet. A happy dog"),
        "computer/floppy_frederic_moser_01.png": ("computer", "clip art of floppy frederic moser, computer"),
        "computer/icons/flat-theme/action/delete_user.png": ("computer", "clip art of delete user, computer"),
        # one copy of the duplicated file name; folders of both copies pooled as context
        "food/desserts/apple_pie_01.png": ("food", "clip art of Apple Pie, food, desserts, fruit: dessert"),
    }


def test_openclipart_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="apt-get install openclipart-png openclipart-svg"):
        load_openclipart(tmp_path)


# ---------------------------------------------------------------- prompts


def test_prompts_and_articles() -> None:
    assert prompts_for("horse")[0] == "a photo of a horse."
    assert "a drawing of an eagle." in prompts_for("eagle")
    assert fill_template("a photo of a {}.", "trousers") == "a photo of trousers."
    assert fill_template("an emoji of a {}.", "unicorn") == "an emoji of a unicorn."
    assert fill_template("a photo of a {}.", "hour glass") == "a photo of an hour glass."
    assert fill_template("a picture of the {}.", "ankle boot") == "a picture of the ankle boot."
    assert 6 <= len(PROMPT_TEMPLATES) <= 8 and len(prompts_for("dog")) == len(PROMPT_TEMPLATES)
    import random

    a = [caption_from_label("dog", random.Random(0)) for _ in range(3)]
    assert a == [caption_from_label("dog", random.Random(0)) for _ in range(3)]
    assert {caption_from_label("dog", random.Random(s)) for s in range(40)} == set(prompts_for("dog"))


# ---------------------------------------------------------------- datasets


def test_image_caption_dataset_skips_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _png(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    items = [
        (bad, "broken"),
        (good, "a red square"),
        (np.zeros((5, 5), np.uint8), ("black", "dark")),
        (Image.new("RGB", (4, 9)), "a tall picture"),
    ]
    ds = ImageCaptionDataset(items, eval_transform(8))
    with pytest.warns(UserWarning, match="bad.jpg: not-an-image"):
        x, caption = ds[0]  # replaced by the next readable item
    assert caption == "a red square" and x.shape == (3, 8, 8)
    assert 0 in ds.bad
    torch.manual_seed(0)
    assert ds[2][1] in ("black", "dark")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 8, 8) and len(batch[1]) == 4
    with pytest.raises(UserError, match="empty caption"):
        ImageCaptionDataset([(good, "  ")], eval_transform(8))


def test_labelled_dataset_on_arrays(tiny_fashion) -> None:
    root, images, labels = tiny_fashion
    ds = LabelledImageDataset(images, labels, eval_transform(16))
    x, y = ds[13]
    assert x.shape == (3, 16, 16) and y == 3 and isinstance(y, int)
    assert torch.allclose(x[0], x[1])  # grey -> three equal channels


# ---------------------------------------------------------------- the --data spec


def test_spec_combines_sources(tiny_fashion, tiny_emoji: Path, tmp_path: Path) -> None:
    data = tmp_path  # holds fashion-mnist/ and emoji/ from the fixtures
    pairs = load_training_pairs("emoji:apple,google+fashion-mnist:test:10", data_root=data, seed=0)
    emoji_pairs = [p for p in pairs if isinstance(p[0], Path)]
    assert len(emoji_pairs) == 3 + 2
    fashion = [p for p in pairs if isinstance(p[0], np.ndarray)]
    assert len(fashion) == 10 and all(p[0].shape == (28, 28) for p in fashion)
    # stratified: 30 images, 3 per class -> 10 kept, one per class
    assert {c.rstrip(".").split(" ")[-1] for _, c in fashion} >= {"sandal", "pullover", "coat"}
    again = load_training_pairs("emoji:apple,google+fashion-mnist:test:10", data_root=data, seed=0)
    assert [c for _, c in again] == [c for _, c in pairs]
    variants = load_training_pairs("emoji:apple:variants", data_root=data)
    assert len(variants) > 3
    names, concepts = load_training_items("emoji:apple,google:names", data_root=data)
    assert [c for _, c in names] == ["grinning face", "flag eg", "thumbs up sign", "grinning face", "thumbs up sign"]
    assert concepts[0] == concepts[3] == "emoji:1F600"  # one emoji in two styles: one concept


def test_spec_folder_and_caption_file(tmp_path: Path) -> None:
    for label in ("cat", "dog"):
        for i in range(4):
            _png(tmp_path / "pets" / label / f"{i}.png")
    pairs = load_training_pairs(str(tmp_path / "pets"), seed=1)
    assert len(pairs) == 8 and all(("cat" in c) != ("dog" in c) for _, c in pairs)
    half = load_training_pairs(str(tmp_path / "pets"), seed=1, fraction=0.5)
    assert len(half) == 4
    (tmp_path / "pairs.jsonl").write_text('{"image": "pets/cat/0.png", "caption": "a grey cat"}\n')
    assert load_training_pairs(str(tmp_path / "pairs.jsonl")) == [(tmp_path / "pets/cat/0.png", "a grey cat")]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("imagenet", "Valid forms"),
        ("emoji:windows", "unknown emoji style"),
        ("emoji", "at least one"),
        ("fashion-mnist:val", "fashion-mnist"),
        ("./missing/pairs.jsonl", "no such file"),
        ("openclipart:x", "no options"),
    ],
)
def test_spec_errors(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        load_training_pairs(spec, data_root=tmp_path)


# ---------------------------------------------------------------- the real data, when installed

_REAL_FASHION = fm.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz"


@pytest.mark.skipif(not _REAL_FASHION.exists(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_test_split() -> None:
    x, y = fm.load_fashion_mnist("test")
    assert x.shape == (10_000, 28, 28)
    assert np.bincount(y).tolist() == [1000] * 10


def _real_emoji_root() -> Path:
    from vitrina.data.paths import data_root

    return data_root() / "emoji"


@pytest.mark.skipif(
    not (_real_emoji_root() / "img" / "facebook" / "64").is_dir(),
    reason="emoji data absent: run make setup (or bash scripts/setup_data.sh)",
)
def test_real_emoji_styles() -> None:
    by_style = {s: load_emoji(s) for s in ("apple", "google", "twitter", "facebook")}
    assert all(len(items) > 1800 for items in by_style.values())
    common = set.intersection(*({i.unified for i in items} for items in by_style.values()))
    assert len(common) > 1800
    assert load_emoji("google")[0].path.is_file()


@pytest.mark.skipif(
    not Path("/usr/share/openclipart/svg").is_dir(),
    reason="Open Clip Art absent: apt-get install openclipart-png openclipart-svg",
)
def test_real_openclipart_sample() -> None:
    meta = read_svg_metadata(next(Path("/usr/share/openclipart/svg/signs_and_symbols/flags").rglob("*.svg")))
    assert meta.title and "flag" in meta.keywords
