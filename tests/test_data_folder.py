"""Collections on disk: Caltech-256 names, captions files, seeded stratified fractions."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vitrina.data.captions import read_pairs
from vitrina.data.folder import CollectionEntry, clean_class_name, scan_collection, stratified_fraction
from vitrina.data.paths import data_root
from vitrina.errors import UserError

CALTECH = {"001.ak47": 10, "022.buddha-101": 20, "062.eiffel-tower": 7, "105.horse": 40, "257.clutter": 3}


def _fake_caltech(root: Path) -> Path:
    base = root / "256_ObjectCategories"
    for i, (folder, n) in enumerate(CALTECH.items()):
        (base / folder).mkdir(parents=True)
        for j in range(n):
            Image.new("RGB", (8, 6), (i * 40, j * 5, 0)).save(base / folder / f"{folder[:3]}_{j:04d}.jpg")
    (base / "001.ak47" / "notes.txt").write_text("not an image")
    (base / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(base / ".hidden" / "x.jpg")
    return base


@pytest.mark.parametrize(
    "dirname,label",
    [
        ("022.buddha-101", "buddha"),
        ("001.ak47", "ak47"),
        ("257.clutter", "clutter"),
        ("062.eiffel-tower", "eiffel tower"),
        ("105.horse", "horse"),
        ("232.t-shirt", "t-shirt"),
        ("253.faces-easy-101", "faces easy"),
        ("ankle_boot", "ankle boot"),
        ("Sandal", "sandal"),
    ],
)
def test_clean_class_name(dirname: str, label: str) -> None:
    assert clean_class_name(dirname) == label


def test_scan_caltech_layout(tmp_path: Path) -> None:
    base = _fake_caltech(tmp_path)
    Image.new("RGB", (4, 4)).save(base / "loose.png")
    entries = scan_collection(base)
    assert len(entries) == sum(CALTECH.values()) + 1  # the .txt and the hidden folder are skipped
    counts = Counter(e.label for e in entries)
    assert counts == {"ak47": 10, "buddha": 20, "eiffel tower": 7, "horse": 40, "clutter": 3, None: 1}
    rel = [e.path.relative_to(base).as_posix() for e in entries]
    assert rel == sorted(rel)
    assert all(e.caption is None for e in entries)


def test_scan_reads_captions_jsonl(tmp_path: Path) -> None:
    root = tmp_path / "col"
    (root / "cats").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "cats" / "a.png")
    Image.new("RGB", (4, 4)).save(root / "b.png")
    lines = [
        {"image": "cats/a.png", "caption": "a  ginger cat"},
        {"file": "b.png", "text": "a box", "label": "box"},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    entries = scan_collection(root)
    assert [(e.path.name, e.label, e.caption) for e in entries] == [
        ("b.png", "box", "a box"),
        ("a.png", "cats", "a ginger cat"),
    ]


def test_scan_missing_folder_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder"):
        scan_collection(tmp_path / "nope")


def test_stratified_fraction_per_class_share(tmp_path: Path) -> None:
    entries = scan_collection(_fake_caltech(tmp_path))
    picked = stratified_fraction(entries, 0.3, seed=0)
    counts = Counter(e.label for e in picked)
    # floor(0.3 n + 0.5), at least one per class
    assert counts == {"ak47": 3, "buddha": 6, "eiffel tower": 2, "horse": 12, "clutter": 1}
    assert set(picked) <= set(entries)
    assert stratified_fraction(entries, 1.0, seed=3) == entries
    tiny = stratified_fraction(entries, 0.01, seed=0)
    assert Counter(e.label for e in tiny) == dict.fromkeys(counts, 1)


def test_stratified_fraction_seeded_and_order_free(tmp_path: Path) -> None:
    entries = scan_collection(_fake_caltech(tmp_path))
    a = stratified_fraction(entries, 0.5, seed=0)
    shuffled = entries.copy()
    random.Random(7).shuffle(shuffled)
    assert stratified_fraction(shuffled, 0.5, seed=0) == a  # listing order does not matter
    assert stratified_fraction(entries, 0.5, seed=0) == a
    assert stratified_fraction(entries, 0.5, seed=1) != a
    # a class's pick depends on (seed, class) only, not on the other classes present
    horses = [e for e in entries if e.label == "horse"]
    assert stratified_fraction(horses, 0.5, seed=0) == [e for e in a if e.label == "horse"]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "0.3", True])
def test_stratified_fraction_rejects_bad_fraction(bad) -> None:
    with pytest.raises(UserError, match="fraction"):
        stratified_fraction([CollectionEntry(Path("a.jpg"), "x")], bad, seed=0)


def test_read_pairs_csv_and_relative_paths(tmp_path: Path) -> None:
    sub = tmp_path / "set"
    sub.mkdir()
    (sub / "pairs.csv").write_text('path,caption\nimg/1.jpg,"a dog, running"\n/abs/2.jpg,a tree\n')
    pairs = read_pairs(sub / "pairs.csv")
    assert [(str(p.path), p.caption) for p in pairs] == [
        (os.path.normpath(sub / "img" / "1.jpg"), "a dog, running"),
        ("/abs/2.jpg", "a tree"),
    ]


@pytest.mark.parametrize(
    "name,text,line",
    [
        ("p.jsonl", '{"image": "a.jpg", "caption": "ok"}\n\n{"image": "b.jpg"}\n', 3),
        ("p.jsonl", '{"image": "a.jpg", "caption": "ok"}\nnot json\n', 2),
        ("p.jsonl", '["a.jpg", "cap"]\n', 1),
        ("p.csv", "image,caption\na.jpg,ok\nb.jpg,\n", 3),
        ("p.csv", "image,caption\na.jpg,one,two\n", 2),
        ("p.csv", "filename,description\na.jpg,x\n", 1),
    ],
)
def test_read_pairs_bad_line_names_file_and_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as info:
        read_pairs(tmp_path / name)
    assert f"{tmp_path / name}:{line}:" in str(info.value)


def test_read_pairs_wrong_suffix_or_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="jsonl"):
        read_pairs(tmp_path / "pairs.txt")
    with pytest.raises(UserError, match="not found"):
        read_pairs(tmp_path / "pairs.jsonl")


def test_data_root_env_override(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VITRINA_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("VITRINA_DATA")
    assert data_root().name == "data"
    assert (data_root().parent / "pyproject.toml").is_file()  # tests run from a checkout
