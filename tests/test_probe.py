"""Representation evaluation: probes reach ~100% on separable features and ~chance on noise, the
kNN vote matches a naive loop, plots are real PNGs, and the CLI runs pretrain -> probe end to end."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vitrina.cli import main
from vitrina.data.fashion_mnist import load_fashion_mnist
from vitrina.data.splits import stratified_indices
from vitrina.eval.probe import (
    LINEAR_BN_PROTOCOL,
    NormalisedPixels,
    bn_linear_probe,
    cluster_scores,
    extract_block_features,
    extract_features,
    knn_accuracy,
    linear_probe,
    multi_block_features,
    multi_block_probe,
    probe_representation,
    tsne_plot,
)
from vitrina.models.vit import ViT, ViTConfig
from vitrina.ssl.data import ImageSet

N_CLASSES = 5


def blobs(n: int, *, separable: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) features and labels: tight clusters far apart, or pure noise with random labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    if not separable:
        return rng.standard_normal((n, 16)).astype(np.float32), labels
    centres = 10 * np.random.default_rng(99).standard_normal((N_CLASSES, 16))  # the same for every call
    return (centres[labels] + 0.1 * rng.standard_normal((n, 16))).astype(np.float32), labels


@pytest.fixture(scope="module")
def fashion_sets() -> tuple[ImageSet, ImageSet]:
    images, labels = load_fashion_mnist("test")
    pixels = torch.from_numpy(images.copy())[:, None]
    full = ImageSet(pixels, labels, [str(c) for c in range(10)], "fashion-mnist:test")
    picked = stratified_indices(labels, 400, seed=0)
    return full.subset(picked[::2], "train part"), full.subset(picked[1::2], "test part")


def test_probes_solve_separable_features():
    train_x, train_y = blobs(500, separable=True, seed=0)
    test_x, test_y = blobs(300, separable=True, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result["accuracy"] == 1.0 and result["n_train"] == 500
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20) == 1.0
    scores = cluster_scores(train_x, train_y, N_CLASSES)
    assert scores["nmi"] > 0.99 and scores["ari"] > 0.99


def test_probes_are_at_chance_on_noise():
    train_x, train_y = blobs(1000, separable=False, seed=1)
    test_x, test_y = blobs(1000, separable=False, seed=2)
    chance = 1 / N_CLASSES
    assert abs(linear_probe(train_x, train_y, test_x, test_y)["accuracy"] - chance) < 0.06
    assert abs(knn_accuracy(train_x, train_y, test_x, test_y, k=20) - chance) < 0.06
    assert cluster_scores(test_x, test_y, N_CLASSES)["nmi"] < 0.02


def test_bn_probe_solves_separable_features_and_is_at_chance_on_noise():
    train_x, train_y = blobs(500, separable=True, seed=0)
    test_x, test_y = blobs(300, separable=True, seed=1)
    result = bn_linear_probe(train_x, train_y, test_x, test_y, epochs=10)
    assert result["accuracy"] == 1.0 and result["protocol"] == LINEAR_BN_PROTOCOL
    noise_train, noise_train_y = blobs(1000, separable=False, seed=1)
    noise_test, noise_test_y = blobs(1000, separable=False, seed=2)
    assert abs(bn_linear_probe(noise_train, noise_train_y, noise_test, noise_test_y)["accuracy"] - 0.2) < 0.06
    again = bn_linear_probe(train_x, train_y, test_x, test_y, epochs=10)
    assert again == result  # seeded


def test_bn_probe_is_blind_to_feature_scale_and_shift():
    # a non-affine BN standardises each feature first, so rescaled, shifted features probe the same
    rng = np.random.default_rng(0)
    train_x, train_y = blobs(401, separable=False, seed=3)  # 401: the last batch of one item is skipped
    train_y = (train_x[:, 0] + 0.5 * train_x[:, 1] > 0).astype(np.int64)  # a linear rule, learnable
    test_x = rng.standard_normal((300, 16)).astype(np.float32)
    test_y = (test_x[:, 0] + 0.5 * test_x[:, 1] > 0).astype(np.int64)
    scale = rng.uniform(0.1, 100, 16).astype(np.float32)
    plain = bn_linear_probe(train_x, train_y, test_x, test_y, epochs=10)
    moved = bn_linear_probe(train_x * scale + 7, train_y, test_x * scale + 7, test_y, epochs=10)
    assert plain["accuracy"] > 0.9 and abs(moved["accuracy"] - plain["accuracy"]) <= 0.02


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (500, 0.1)])
def test_knn_matches_a_naive_weighted_vote(k, temperature):
    rng = np.random.default_rng(k)
    train_x, test_x = rng.standard_normal((120, 8)), rng.standard_normal((30, 8))
    train_y, test_y = rng.integers(0, 4, 120), rng.integers(0, 4, 30)
    correct = 0
    for q, label in zip(test_x, test_y, strict=True):
        sims = [float(q @ t / (np.linalg.norm(q) * np.linalg.norm(t))) for t in train_x]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[: min(k, len(sims))]
        votes = [0.0] * 4
        for i in nearest:
            votes[train_y[i]] += math.exp(sims[i] / temperature)
        correct += int(np.argmax(votes) == label)
    got = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature, chunk=7)
    assert got == pytest.approx(correct / len(test_y))


def test_tsne_plot_writes_a_png(tmp_path):
    x, y = blobs(150, separable=True, seed=3)
    tsne_plot(x, y, [f"class {i}" for i in range(N_CLASSES)], tmp_path / "tsne.png", max_points=100)
    with Image.open(tmp_path / "tsne.png") as image:
        image.load()
        assert image.size[0] > 200 and image.size[1] > 200


def test_extract_features_is_pooled_and_leaves_the_mode(fashion_sets):
    model = ViT(ViTConfig(image_size=28, patch_size=4, width=32, depth=1, heads=2))
    model.train()
    train, _ = fashion_sets
    x, y = extract_features(model, NormalisedPixels(train), batch_size=64)
    assert x.shape == (len(train), 32) and x.dtype == np.float32 and np.array_equal(y, train.labels)
    assert model.training
    model.eval()
    with torch.no_grad():
        first = model(NormalisedPixels(train)[0][0][None])[0].numpy()
    np.testing.assert_allclose(x[0], first, rtol=1e-4, atol=1e-5)


def test_extract_features_can_pool_by_mean_for_one_call(fashion_sets):
    model = ViT(ViTConfig(image_size=28, patch_size=4, width=32, depth=1, heads=2))
    train, _ = fashion_sets
    x, _ = extract_features(model, NormalisedPixels(train), pool="mean")
    with torch.no_grad():
        tokens = model.forward_features(NormalisedPixels(train)[0][0][None])  # (1, 1+N, C)
    np.testing.assert_allclose(x[0], tokens[0, 1:].mean(dim=0).numpy(), rtol=1e-4, atol=1e-5)
    assert model.config.pool == "cls"  # the model's own setting is back


def test_forward_intermediates_ends_with_the_features_the_head_reads():
    model = ViT(ViTConfig(image_size=28, patch_size=7, width=32, depth=3, heads=2)).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        outputs = model.forward_intermediates(pixels, 2)
        torch.testing.assert_close(outputs[-1], model.forward_features(pixels))
        x = model.embed(pixels)
        for block in model.blocks[:2]:
            x = block(x)
        torch.testing.assert_close(outputs[0], model.norm(x))  # the block before the last, normed alike
    assert len(outputs) == 2
    with pytest.raises(ValueError, match="has 3 blocks"):
        model.forward_intermediates(pixels, 4)


def test_multi_block_features_stack_the_last_blocks_then_the_mean_token():
    pooled = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)  # (N, blocks, D)
    mean_tokens = -np.ones((2, 3), dtype=np.float32)
    assert np.array_equal(multi_block_features(pooled, mean_tokens, 1, False), pooled[:, 3])
    both = multi_block_features(pooled, mean_tokens, 4, True)
    assert both.shape == (2, 15) and np.array_equal(both[:, :12], pooled.reshape(2, 12))
    assert np.array_equal(both[:, 12:], mean_tokens)


def test_multi_block_probe_picks_its_choice_on_held_out_training_features(fashion_sets):
    model = ViT(ViTConfig(image_size=28, patch_size=7, width=32, depth=4, heads=2))
    train, test = fashion_sets
    result = multi_block_probe(model, NormalisedPixels(train), NormalisedPixels(test), seed=0, batch_size=64)
    assert set(result["val_accuracy"]) == {"1 block", "1 block + mean token", "4 blocks", "4 blocks + mean token"}
    assert result["val_accuracy"][result["choice"]] == max(result["val_accuracy"].values())
    assert result["choice"].startswith(f"{result['blocks']} block")
    assert result["feature_dim"] == 32 * result["blocks"] + 32 * result["avgpool"]
    assert result["n_train"] == len(train) and result["n_test"] == len(test) and 0.1 < result["accuracy"] <= 1
    # the one-block choice without the mean token reads what the plain linear probe reads
    plain, labels = extract_features(model, NormalisedPixels(test), batch_size=64)
    pooled, _, same_labels = extract_block_features(model, NormalisedPixels(test), blocks=4, batch_size=64)
    np.testing.assert_allclose(pooled[:, -1], plain, rtol=1e-4, atol=1e-5)
    assert np.array_equal(labels, same_labels) and model.training  # the mode is restored


def test_probe_representation_on_pixels_beats_chance_and_writes_its_files(fashion_sets, tmp_path):
    train, test = fashion_sets
    results = probe_representation(None, train, test, tmp_path, tsne_points=100)
    assert results["feature_dim"] == 28 * 28
    assert results["linear"]["accuracy"] > 0.5 and results["knn"]["k20"] > 0.5  # 10 classes: chance is 0.1
    assert 0 < results["cluster"]["nmi"] <= 1
    assert json.loads((tmp_path / "probe.json").read_text())["linear"] == results["linear"]
    assert (tmp_path / "tsne.png").stat().st_size > 0


def test_cli_pretrains_then_probes(tmp_path, capsys):
    ckpt = tmp_path / "rotation"
    args = ["pretrain", "rotation", "--backbone", "vit-fmnist-28-fast", "--data", "fashion-mnist:train:128"]
    assert main([*args, "--out", str(ckpt), "--epochs", "1", "--batch-size", "64"]) == 0
    assert (ckpt / "model.safetensors").is_file()
    probe = ["eval", "probe", "--ckpt", str(ckpt), "--limit-train", "200", "--limit-test", "100"]
    assert main([*probe, "--tsne-points", "60", "--out", str(tmp_path / "probe"), "--probe-bn", "--multi-block"]) == 0
    results = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert results["linear_multiblock"]["n_test"] == 100 and results["linear_multiblock"]["blocks"] in (1, 4)
    assert results["linear"]["n_train"] == 200 and results["linear"]["n_test"] == 100
    assert results["linear_bn"]["protocol"] != results["linear"]["protocol"]  # two protocols, side by side
    assert results["linear_bn"]["n_test"] == 100 and 0 <= results["linear_bn"]["accuracy"] <= 1
    assert "linear-bn" in (printed := capsys.readouterr().out) and "linear-multiblock" in printed
    assert main(["eval", "probe", "--ckpt", "pixels", "--data", "no-such-source", "--out", str(tmp_path / "x")]) == 2
    assert "not a known source" in capsys.readouterr().err


def test_cli_probes_across_sources_matching_classes_by_name(tmp_path, capsys):
    # two "styles" of the same classes (plus one class only the second has): fit on one, score on the other
    rng = np.random.default_rng(0)
    for style, classes in (("flat", ["circle", "square"]), ("shaded", ["square", "circle", "star"])):
        for name in classes:
            (tmp_path / style / name).mkdir(parents=True)
            for i in range(6):
                shade = 40 if name == "circle" else 210
                pixels = np.clip(shade + rng.normal(0, 20 if style == "shaded" else 5, (16, 16, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / style / name / f"{i}.png")
    out = tmp_path / "probe"
    args = ["eval", "probe", "--ckpt", "pixels", "--train-data", str(tmp_path / "flat"), "--data"]
    assert main([*args, str(tmp_path / "shaded"), "--tsne-points", "10", "--out", str(out)]) == 0
    results = json.loads((out / "probe.json").read_text())
    assert results["linear"]["n_train"] == 12 and results["linear"]["n_test"] == 12  # the 6 stars left out
    assert results["linear"]["accuracy"] == 1.0
    (tmp_path / "other" / "triangle").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "other" / "triangle" / "0.png")
    assert main([*args, str(tmp_path / "other"), "--out", str(tmp_path / "x")]) == 2
    assert "shares no class name" in capsys.readouterr().err


def test_an_ssl_backbone_fine_tunes_through_the_transfer_code(tmp_path, capsys):
    ckpt = tmp_path / "rotation"
    args = ["pretrain", "rotation", "--backbone", "vit-fmnist-28-fast", "--data", "fashion-mnist:train:128"]
    assert main([*args, "--out", str(ckpt), "--epochs", "1", "--batch-size", "64"]) == 0
    tune = ["train", "classify", "--init", str(ckpt), "--mode", "finetune", "--data", "fashion-mnist", "--limit", "300"]
    assert main([*tune, "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path / "ft")]) == 0
    printed = capsys.readouterr().out
    assert "trainable" in printed  # total and trainable parameter counts come first
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert 0 <= results["test_acc"] <= 1 and results["test_images"] > 0
