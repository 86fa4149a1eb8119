"""Transfer learning: freeze policies really freeze, layer decay sets the lr per layer, the linear
probe learns separable features, and a CLIP checkpoint's image tower becomes a classifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitrina.checkpoint import save_model
from vitrina.config import TrainConfig
from vitrina.errors import UserError
from vitrina.models.cnn import CNN, CNNConfig
from vitrina.models.registry import build_model
from vitrina.models.swin import Swin, SwinConfig
from vitrina.models.vit import ViT, ViTConfig
from vitrina.train.loop import train
from vitrina.train.transfer import (
    FeatureDataset,
    FreezePolicy,
    freeze,
    layer_decay_groups,
    layer_ids,
    load_backbone,
    probe_loss,
    with_new_head,
)


def tiny_models():
    torch.manual_seed(0)
    return {
        "vit": ViT(ViTConfig(image_size=28, patch_size=7, width=32, depth=3, heads=2, num_classes=5)),
        "swin": Swin(
            SwinConfig(
                image_size=28, patch_size=2, embed_dim=16, depths=(2, 2), heads=(2, 2), window_size=7, num_classes=5
            )
        ),
        "cnn": CNN(CNNConfig(image_size=28, widths=(8, 16), blocks=(1, 2), num_classes=5)),
    }


def one_step(model) -> dict[str, torch.Tensor]:
    """One AdamW step on random data; returns the state dict before it."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    return before


@pytest.mark.parametrize("kind", ["vit", "swin", "cnn"])
@pytest.mark.parametrize("policy", ["all-but-head", "first-1", "none"])
def test_frozen_parameters_get_no_gradient_and_do_not_move(kind, policy):
    model = tiny_models()[kind]
    frozen = set(freeze(model, FreezePolicy.parse(policy)))
    ids = layer_ids(model)
    if policy == "all-but-head":
        assert frozen == {n for n in ids if not n.startswith("head")}
    elif policy == "first-1":
        assert frozen == {n for n, layer in ids.items() if layer <= 1} and frozen
    else:
        assert frozen == set()
    before = one_step(model)
    after = model.state_dict()
    for name, p in model.named_parameters():
        assert p.requires_grad == (name not in frozen)
        if name in frozen:
            assert p.grad is None
            assert torch.equal(after[name], before[name]), name
        else:
            assert not torch.equal(after[name], before[name]), name
    # BatchNorm statistics of frozen layers stay too
    for name in after:
        if name.endswith(("running_mean", "running_var")) and name.rsplit(".", 1)[0] + ".weight" in frozen:
            assert torch.equal(after[name], before[name]), name


def test_freeze_policy_errors_name_the_problem():
    with pytest.raises(UserError, match="--freeze 'last-2'"):
        FreezePolicy.parse("last-2")
    with pytest.raises(UserError, match="only 3 blocks"):
        freeze(tiny_models()["vit"], FreezePolicy.parse("first-9"))


def test_layer_ids_follow_the_forward_order():
    ids = layer_ids(tiny_models()["vit"])
    assert ids["pos_embed"] == ids["patch_embed.proj.weight"] == ids["cls_token"] == 0
    assert [ids[f"blocks.{i}.attn.qkv.weight"] for i in range(3)] == [1, 2, 3]
    assert ids["norm.weight"] == ids["head.weight"] == 4
    swin = layer_ids(tiny_models()["swin"])
    assert swin["stages.1.merge.reduction.weight"] == swin["stages.1.blocks.0.attn.qkv.weight"] == 3


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_layer_decay_gives_each_layer_its_lr(kind):
    model = tiny_models()[kind]
    ids = layer_ids(model)
    last = max(ids.values())
    groups = layer_decay_groups(model, lr=1e-3, decay=0.5, weight_decay=0.05)
    seen = set()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (last - ids[name]))
            assert group["weight_decay"] == (0.0 if p.ndim < 2 or name in ("pos_embed", "cls_token") else 0.05)
    assert seen == set(names.values())
    # the loop's LambdaLR schedule scales every group's own lr
    expected = [g["lr"] * 0.5 for g in groups]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)


def save_model_weights(head: torch.nn.Module, folder) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))


def test_linear_probe_learns_linearly_separable_features(tmp_path):
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 16, generator=g)
    labels = torch.arange(400) % 4
    features = directions[labels] * 3 + torch.randn(400, 16, generator=g) * 0.5  # four separable clusters
    head = torch.nn.Linear(16, 4)
    loss_fn = probe_loss(head, 0.0)
    summary = train(
        model=head,
        step_fn=lambda _, batch: loss_fn(*batch),
        train_data=FeatureDataset(features, labels),
        out_dir=tmp_path / "probe",
        config=TrainConfig(epochs=5, batch_size=50, lr=1e-2, weight_decay=0.0),
        save_fn=lambda m, folder: save_model_weights(m, folder),
        progress=False,
    )
    assert summary.epochs_done == 5
    with torch.no_grad():
        accuracy = (head(features).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.99


def test_a_clip_checkpoint_gives_its_image_tower_with_a_new_head(tmp_path):
    clip = build_model("clip-tiny")
    save_model(clip, tmp_path / "clip")
    backbone, preprocess, described = load_backbone(tmp_path / "clip")
    assert isinstance(backbone, ViT) and "image tower" in described
    assert preprocess.image_size == clip.config.vision.image_size == 32
    model = with_new_head(backbone, 10)
    torch.testing.assert_close(model.patch_embed.proj.weight, clip.visual.patch_embed.proj.weight)
    assert model(preprocess(torch.rand(2, 1, 28, 28))).shape == (2, 10)  # 28 px grey in, resized to 32 px RGB
    with pytest.raises(UserError, match="no such checkpoint folder"):
        load_backbone(tmp_path / "missing")
