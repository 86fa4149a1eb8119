"""bench/fmnist_classify.py end to end on a Fashion-MNIST subset: a seed trains into its row, and
``--retest-of`` tests that row's checkpoint again with other test settings, training nothing."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vitrina.checkpoint import load_model
from vitrina.data.fashion_mnist import DEFAULT_ROOT
from vitrina.train.classify import predict, preprocess_of
from vitrina.train.classify_data import load_classification_data, unit_pixels

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
spec = importlib.util.spec_from_file_location("fmnist_classify_under_test", REPO / "bench" / "fmnist_classify.py")
fmnist_classify = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = fmnist_classify  # its dataclasses look their module up there
spec.loader.exec_module(fmnist_classify)
report = sys.modules["bench._report"]

pytestmark = pytest.mark.skipif(
    not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
)


def run_bench(monkeypatch, tmp_path, *args: str) -> dict:
    # main() points the report module at --results-dir: monkeypatch puts it back for the other tests
    monkeypatch.setattr(report, "RESULTS_DIR", report.RESULTS_DIR)
    monkeypatch.setattr(report, "MARKDOWN", report.MARKDOWN)
    common = ["--minutes", "0.04", "--limit", "300", "--log-every", "2", "--out", str(tmp_path / "runs")]
    argv = ["fmnist_classify.py", *args, *common, "--results-dir", str(tmp_path / "results")]
    monkeypatch.setattr(sys, "argv", argv)
    fmnist_classify.main()
    return json.loads((tmp_path / "results" / "fmnist_classify.json").read_text())


def test_a_retest_tests_the_trained_checkpoint_again_with_shift_tta(monkeypatch, tmp_path):
    table = run_bench(monkeypatch, tmp_path, "--run", "vit-scratch-p7", "--seed", "0")
    trained = table["vit-scratch-p7"]["per_seed"]["0"]
    assert trained["tta_views"] == 2 and "tta_shift" not in table["vit-scratch-p7"]["recipe"]

    retest = ["--run", "vit-scratch-p7", "--retest-of", "vit-scratch-p7", "--tta-shift", "1", "--name", "p7-tta10"]
    table = run_bench(monkeypatch, tmp_path, *retest, "--seed", "0")
    row = table["p7-tta10"]
    assert row["recipe"]["retest_of"] == "vit-scratch-p7" and row["recipe"]["tta_shift"] == 1
    seed = row["per_seed"]["0"]
    assert seed["tta_views"] == 10
    # what the checkpoint cost is carried over from the seed that trained it, with that seed's command
    assert (seed["epochs"], seed["train_minutes"]) == (trained["epochs"], trained["train_minutes"])
    assert "--run vit-scratch-p7" in seed["trained_by"]["command"] and "--retest-of" in seed["command"]
    assert table["vit-scratch-p7"]["per_seed"]["0"] == trained  # the source row is left as it was

    # the accuracy is that of the source's best checkpoint under 10-view TTA, on the same test images
    model, config = load_model(tmp_path / "runs" / "vit-scratch-p7" / "seed0" / "best")
    data = load_classification_data("fashion-mnist", limit=300, seed=fmnist_classify.SPLIT_SEED)
    pixels = unit_pixels(data.test, 28)
    logits = predict(model, pixels, preprocess_of(config, model), tta=True, tta_shift=1)
    assert seed["test_acc"] == pytest.approx(float((logits.argmax(1) == data.test.labels).float().mean()))


def test_a_retest_refuses_another_recipe_or_a_missing_seed(monkeypatch, tmp_path):
    run_bench(monkeypatch, tmp_path, "--run", "vit-scratch-p7", "--seed", "0")
    with pytest.raises(SystemExit, match="differs from --run's in .*preset"):
        run_bench(monkeypatch, tmp_path, "--run", "hybrid-scratch", "--retest-of", "vit-scratch-p7", "--name", "x")
    with pytest.raises(SystemExit, match="no seed 1"):
        retest = ["--run", "vit-scratch-p7", "--retest-of", "vit-scratch-p7", "--name", "y"]
        run_bench(monkeypatch, tmp_path, *retest, "--seed", "1")
    table = json.loads((tmp_path / "results" / "fmnist_classify.json").read_text())
    assert list(table) == ["vit-scratch-p7"]  # nothing written by the refused runs
