"""The benchmark report: rows merge into their JSON one at a time, and BENCHMARKS.md is rebuilt from
the JSON files with each benchmark's notes, table, provenance and pictures."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def report(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_report_under_test", REPO / "bench" / "_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bench = tmp_path / "bench"
    (bench / "notes").mkdir(parents=True)
    monkeypatch.setattr(module, "BENCH_DIR", bench)
    monkeypatch.setattr(module, "RESULTS_DIR", bench / "results")
    monkeypatch.setattr(module, "MARKDOWN", tmp_path / "BENCHMARKS.md")
    return module


def test_rows_merge_and_the_markdown_carries_notes_table_and_pictures(report):
    report.BENCH_DIR.joinpath("notes", "speed.md").write_text("Protocol: one run per row.\n")
    report.record("speed", "a", {"img_per_s": 12.5}, command="bench/speed.py --run a")
    report.RESULTS_DIR.joinpath("speed-a.png").write_bytes(b"\x89PNG")
    report.record("speed", "b", {"img_per_s": 20.0, "epochs": 3}, command="bench/speed.py --run b")
    table = json.loads((report.RESULTS_DIR / "speed.json").read_text())
    assert list(table) == ["a", "b"] and table["a"]["img_per_s"] == 12.5 and table["b"]["epochs"] == 3
    assert {"command", "machine", "date"} <= set(table["a"])
    text = report.MARKDOWN.read_text()
    order = [text.index(part) for part in ("## speed", "Protocol: one run per row.", "| row | img_per_s | epochs |")]
    assert order == sorted(order)
    assert "| a | 12.5 |  |" in text and "| b | 20 | 3 |" in text
    assert "- `bench/speed.py --run a` on " in text
    assert "![speed-a](bench/results/speed-a.png)" in text


def test_seeds_merge_into_one_row_whose_headline_is_their_mean(report):
    recipe = {"preset": "vit-hybrid-fmnist", "budget_minutes": 30.0, "ema": True, "tta": True}
    options = {"recipe": recipe, "shown": ("preset", "ema")}
    seed0 = {"test_acc": 0.93, "train_minutes": 30.0, "params": 2298106, "checkpoint": "runs/x/seed0/best"}
    report.record_seed("fm", "hybrid", 0, seed0, **options)
    report.record_seed("fm", "hybrid", 1, {**seed0, "test_acc": 0.94, "train_minutes": 29.0}, **options)
    report.record_seed("fm", "hybrid", 1, {**seed0, "test_acc": 0.95, "train_minutes": 29.0}, **options)  # a rerun
    row = json.loads((report.RESULTS_DIR / "fm.json").read_text())["hybrid"]
    assert row["test_acc"] == pytest.approx(0.94) and row["test_acc_per_seed"] == [0.93, 0.95]
    assert (row["n_seeds"], row["seeds"], row["train_minutes"]) == (2, [0, 1], pytest.approx(29.5))
    assert row["params"] == 2298106 and isinstance(row["params"], int)  # shared by the seeds: kept, not averaged
    assert row["per_seed"]["1"]["checkpoint"] == "runs/x/seed0/best" and "checkpoint" not in row  # not averaged
    assert row["recipe"] == recipe and (row["preset"], row["ema"]) == ("vit-hybrid-fmnist", True)
    assert list(row)[:2] == ["test_acc", "test_acc_per_seed"]
    text = report.MARKDOWN.read_text()
    assert "| row | test_acc | test_acc_per_seed | n_seeds | seeds | train_minutes | params | preset | ema |" in text
    assert "| hybrid | 0.94 | 0.93 / 0.95 | 2 | 0 / 1 | 29.5 | 2298106 | vit-hybrid-fmnist | True |" in text
    with pytest.raises(SystemExit, match=r"holds seeds \['0', '1'\] of another recipe \(ema differ\)"):
        report.record_seed("fm", "hybrid", 2, seed0, recipe={**recipe, "ema": False})


def test_each_seed_keeps_the_machine_it_ran_on(report, monkeypatch):
    """Seeds of one row can run on different machines (a session's machine is not always the last one's):
    each seed records its own command, machine and date, and the markdown lists every one of them."""
    recipe = {"preset": "vit-hybrid-fmnist", "budget_minutes": 30.0}
    monkeypatch.setattr(report, "machine_summary", lambda: "AMD EPYC, 2 cores")
    report.record_seed("fm", "kd", 0, {"test_acc": 0.93}, recipe=recipe, command="bench/fm.py --run kd --seed 0")
    monkeypatch.setattr(report, "machine_summary", lambda: "Intel Xeon, 2 cores")
    report.record_seed("fm", "kd", 1, {"test_acc": 0.94}, recipe=recipe, command="bench/fm.py --run kd --seed 1")
    row = json.loads((report.RESULTS_DIR / "fm.json").read_text())["kd"]
    assert row["per_seed"]["0"]["machine"] == "AMD EPYC, 2 cores" and row["per_seed"]["0"]["command"].endswith("0")
    assert row["per_seed"]["1"]["machine"] == row["machine"] == "Intel Xeon, 2 cores"
    assert row["test_acc"] == pytest.approx(0.935) and "machine_per_seed" not in row  # provenance is not a metric
    text = report.MARKDOWN.read_text()
    assert "- `bench/fm.py --run kd --seed 0` on AMD EPYC, 2 cores" in text
    assert "- `bench/fm.py --run kd --seed 1` on Intel Xeon, 2 cores" in text
