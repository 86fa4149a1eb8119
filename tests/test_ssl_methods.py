"""Self-supervised methods: their labels decode back to the transformation applied, MAE's masking
keeps and restores the right patches, DeepCluster survives empty clusters, a few steps of every
method lower its loss on a fixed batch of real Fashion-MNIST images, and the driver saves a plain
ViT checkpoint."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitrina.checkpoint import load_model
from vitrina.cli import SSL_METHODS
from vitrina.config import TrainConfig
from vitrina.data.fashion_mnist import load_fashion_mnist
from vitrina.errors import UserError
from vitrina.models.registry import build_model
from vitrina.models.vit import ViT, ViTConfig
from vitrina.ssl import METHODS, build_method
from vitrina.ssl.augment import SimCLRAugment, color_jitter, cut_tiles, gaussian_blur, random_resized_crop, rotate90
from vitrina.ssl.byol import BYOLConfig
from vitrina.ssl.colorization import ColorizationConfig
from vitrina.ssl.common import HEADS_FILE, plan_budget, pretrain, to_input
from vitrina.ssl.data import load_image_set
from vitrina.ssl.deepcluster import DeepCluster, DeepClusterConfig, cluster_features, fill_empty_clusters
from vitrina.ssl.dino import DINOConfig
from vitrina.ssl.jigsaw import Jigsaw, JigsawConfig, max_hamming_permutations, shuffle_tiles, unshuffle_tiles
from vitrina.ssl.mae import MAE, MAEConfig, kept_count, random_masking, save_reconstructions
from vitrina.ssl.relative_position import NEIGHBOURS, relative_position_pairs
from vitrina.ssl.rotation import rotation_batch
from vitrina.ssl.vicreg import VICRegConfig

TINY = ViTConfig(image_size=28, patch_size=4, width=32, depth=1, heads=2)


@pytest.fixture(scope="module")
def fashion() -> torch.Tensor:
    """32 real Fashion-MNIST training images, uint8 (32, 1, 28, 28)."""
    images, _ = load_fashion_mnist("train")
    return torch.from_numpy(images[:32].copy())[:, None]


@pytest.fixture(scope="module")
def tinted(fashion) -> torch.Tensor:
    """The same garments, each tinted one random colour: colour data for colorization, uint8 (32, 3, 28, 28)."""
    colours = torch.rand(len(fashion), 3, 1, 1, generator=torch.Generator().manual_seed(0))
    return (fashion.float() * colours).round().to(torch.uint8)


def cell_image(batch: int = 2, size: int = 28) -> torch.Tensor:
    """Images whose 3 x 3 cells (of size // 3 px) hold their own cell index as the pixel value."""
    x = torch.full((batch, 3, size, size), -1.0)
    cell = size // 3
    for j in range(9):
        x[:, :, (j // 3) * cell : (j // 3 + 1) * cell, (j % 3) * cell : (j % 3 + 1) * cell] = j
    return x


def test_rotation_labels_decode_back_to_the_original(fashion):
    x = to_input(fashion[:16])
    rotated, labels = rotation_batch(x)
    assert set(labels.tolist()) <= {0, 1, 2, 3} and len(set(labels.tolist())) > 1
    assert torch.equal(rotate90(rotated, -labels), x)
    turned = labels != 0
    assert not torch.equal(rotated[turned], x[turned])  # a non-zero label really rotated the image


def test_jigsaw_permutation_set_is_spread_and_seeded():
    perms = max_hamming_permutations(64)
    assert perms.shape == (64, 9) and len({tuple(p) for p in perms}) == 64
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    distances = (perms[:, None] != perms[None]).sum(-1) + 99 * np.eye(64, dtype=int)
    assert distances.min() >= 7  # random sets of 64 reach 4 or 5
    assert np.array_equal(max_hamming_permutations(10, seed=1), max_hamming_permutations(10, seed=1))


def test_jigsaw_labels_decode_back_to_the_original(fashion):
    method = Jigsaw(ViT(TINY), JigsawConfig(n_permutations=16))
    canvas, labels = method.puzzle(cell_image(batch=8))
    perms = method.permutations[labels]  # (B, 9)
    tiles = cut_tiles(canvas, grid=3, tile=method.config.tile, jitter=False)  # (B, 9, C, t, t) in slot order
    assert torch.equal(tiles.mean(dim=(2, 3, 4)), perms.float())  # slot j shows tile perms[j]
    assert torch.equal(unshuffle_tiles(tiles, perms).mean(dim=(2, 3, 4)), torch.arange(9.0).expand(8, 9))
    real = cut_tiles(to_input(fashion[:8]), grid=3, tile=7, jitter=True)
    assert torch.equal(unshuffle_tiles(shuffle_tiles(real, perms), perms), real)


def test_relative_position_labels_name_the_neighbour_cell():
    centre, neighbour, labels = relative_position_pairs(cell_image(batch=32), tile=7)
    assert torch.all(centre == 4)
    assert torch.equal(neighbour.mean(dim=(1, 2, 3)), torch.tensor(NEIGHBOURS, dtype=torch.float)[labels])


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_mae_masking_keeps_round_share_and_restores_order(ratio):
    b, n, d = 4, 49, 3
    tokens = torch.arange(b * n * d, dtype=torch.float).view(b, n, d)
    kept, mask, ids_restore = random_masking(tokens, ratio)
    keep = round((1 - ratio) * n)
    assert kept_count(n, ratio) == keep and kept.shape == (b, keep, d)
    assert torch.equal(mask.sum(dim=1), torch.full((b,), float(n - keep)))
    filled = torch.cat([kept, torch.full((b, n - keep, d), -1.0)], dim=1)
    restored = torch.gather(filled, 1, ids_restore[:, :, None].expand(-1, -1, d))
    visible = mask == 0
    assert torch.equal(restored[visible], tokens[visible])  # visible tokens back in their own places
    assert torch.all(restored[~visible] == -1)  # and the placeholders exactly where the mask is


def test_mae_encoder_is_a_plain_vit_with_the_presets_names():
    mae = MAE(build_model("vit-fmnist-28"))
    assert isinstance(mae.backbone, ViT)
    assert set(mae.backbone.state_dict()) == set(build_model("vit-fmnist-28").state_dict())


def test_fill_empty_clusters_splits_the_largest():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 4))
    assignments = np.where(np.arange(40) < 30, 0, 2)  # clusters 1 and 3 empty, 0 the largest
    centroids = rng.standard_normal((4, 4))
    filled, new_centroids = fill_empty_clusters(features, assignments, centroids, rng)
    counts = np.bincount(filled, minlength=4)
    assert (counts > 0).all() and counts.sum() == 40
    assert set(np.flatnonzero(filled == 2)) == set(range(30, 40))  # the untouched cluster kept its members
    assert not np.shares_memory(filled, assignments)


def test_deepcluster_survives_clusters_left_empty_by_kmeans():
    # 3 distinct points but 5 clusters: k-means alone must leave clusters empty or duplicate
    features = np.repeat(np.eye(3, 8), 10, axis=0) + 0.0
    assignments = cluster_features(features, 5, pca_dim=4, seed=0)
    assert (np.bincount(assignments, minlength=5) > 0).all()


def test_every_method_is_registered():
    assert set(METHODS) == {
        "rotation",
        "jigsaw",
        "relative-position",
        "inpainting",
        "colorization",
        "simclr",
        "deepcluster",
        "mae",
        "vicreg",
        "byol",
        "dino",
    }
    assert tuple(METHODS) == SSL_METHODS  # the CLI's spelt-out names (no torch import for --help)


# small heads and decoders, so that a few steps on a width-32 backbone move the loss in seconds
SMALL_OPTIONS = {
    "deepcluster": {"config": DeepClusterConfig(n_clusters=8)},
    "colorization": {"config": ColorizationConfig(bins=4)},
    "mae": {"config": MAEConfig(decoder_width=32, decoder_depth=1, decoder_heads=2)},
    "vicreg": {"config": VICRegConfig(expander_dims=(64, 64))},
    "byol": {"config": BYOLConfig(hidden=64, projection_dim=32)},
    # DINO's loss is a cross-entropy to a moving target (the teacher sharpens and the centre shifts), so it
    # can rise while it learns; a frozen teacher and centre make a fixed problem, as the fixed views do
    "dino": {"config": DINOConfig(hidden=64, bottleneck=32, prototypes=64, ema=1.0, centre_momentum=1.0)},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(name, fashion, tinted):
    torch.manual_seed(0)
    method = build_method(name, ViT(TINY), **SMALL_OPTIONS.get(name, {}))
    pixels = tinted if name == "colorization" else fashion
    method.prepare(pixels)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    batch = (pixels, torch.arange(len(pixels)))
    losses = []
    for _ in range(20):
        torch.manual_seed(1)  # the same augmentations / masks / puzzles every step: a fixed problem
        out = method.step(batch)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] and np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_simclr_views_differ_but_keep_shape(fashion):
    x = to_input(fashion[:8])
    a, b = SimCLRAugment()(x), SimCLRAugment()(x)
    assert a.shape == x.shape and not torch.equal(a, b) and a.min() >= -1 and a.max() <= 1


def test_augmentations_at_zero_strength_are_the_identity(fashion):
    x = to_input(fashion[:8])
    assert torch.allclose(random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0), x, atol=1e-5)
    flipped = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    assert torch.allclose(gaussian_blur(x, sigma=(0.5, 1.0), p=0.0), x, atol=1e-6)
    assert torch.allclose(color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, p=0.0), x, atol=1e-6)
    blurred = gaussian_blur(x, sigma=(1.0, 1.0), p=1.0)
    assert blurred.std() < x.std()  # a real blur smooths


def test_bad_inputs_are_user_errors(fashion):
    with pytest.raises(UserError, match="colour images"):
        build_method("colorization", ViT(TINY)).prepare(fashion)
    with pytest.raises(UserError, match="unknown self-supervised method"):
        build_method("rotnet", ViT(TINY))
    with pytest.raises(UserError, match="not a known source"):
        load_image_set("no-such-data", 28)
    with pytest.raises(UserError, match="fewer than one batch"):
        rotation = build_method("rotation", ViT(TINY))
        pretrain(rotation, fashion[:4], "/nonexistent", TrainConfig(batch_size=8), data_name="fashion-mnist:4")


def test_plan_budget_fits_the_cap():
    assert plan_budget(100.0, 60_000, 30, overhead=1.0).epochs == 3
    below = plan_budget(10.0, 60_000, 30, overhead=1.0)
    assert (below.epochs, below.n_items) == (1, 18_000)


def test_pretrain_saves_a_vit_checkpoint_and_logs_deepcluster_nmi(fashion, tmp_path):
    labels = load_fashion_mnist("train")[1][:32]
    method = DeepCluster(ViT(TINY), DeepClusterConfig(n_clusters=5), reference_labels=labels)
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-3, val_fraction=0.0, log_every=1)
    summary = pretrain(method, fashion, tmp_path / "run", config, data_name="fashion-mnist:32", progress=False)
    assert summary.epochs_done == 2
    backbone, saved = load_model(tmp_path / "run")
    assert isinstance(backbone, ViT) and saved["pretrain"]["method"] == "deepcluster"
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, method.backbone.state_dict()[name])
    heads = load_file(str(tmp_path / "run" / HEADS_FILE))
    assert "head.weight" in heads and heads["pseudo_labels"].shape == (32,)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r["eval"] for r in records if "eval" in r]
    assert len(rounds) == 2 and all(0 <= r["nmi_labels"] <= 1 for r in rounds)
    assert rounds[-1]["round"] == 3  # the first round ran before training, one more after each epoch


def test_mae_reconstruction_png_is_written_and_decodable(fashion, tmp_path):
    mae = MAE(ViT(TINY), SMALL_OPTIONS["mae"]["config"])
    save_reconstructions(mae, to_input(fashion[:4]), tmp_path / "rec.png")
    with Image.open(tmp_path / "rec.png") as image:
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100
