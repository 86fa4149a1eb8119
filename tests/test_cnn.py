"""The small ResNet: in torchvision's resnet18 layout it computes what torchvision computes, on the same
weights; its presets build, run and train."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from vitrina.config import from_json, to_json
from vitrina.models.cnn import CNN, CNN_PRESETS, CNNConfig, cnn_state_dict_from_torchvision

RESNET18 = CNNConfig(
    widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem_kernel=7, stem_stride=2, stem_pool=True, num_classes=7
)


def _torchvision_and_ours() -> tuple[torch.nn.Module, CNN]:
    """torchvision's resnet18 (random weights, no download) with BatchNorm parameters and running statistics
    moved away from their init, so eval mode really uses them; ours with those weights copied in."""
    torch.manual_seed(0)
    peer = resnet18(weights=None, num_classes=7)
    with torch.no_grad():
        for name, t in peer.state_dict().items():
            if name.endswith("running_mean"):
                t.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
        for module in peer.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    ours = CNN(RESNET18)
    ours.load_state_dict(cnn_state_dict_from_torchvision(peer.state_dict()), strict=True)
    return peer, ours


def test_parity_with_torchvision_resnet18_eval() -> None:
    peer, ours = _torchvision_and_ours()
    peer.eval(), ours.eval()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)  # the layout ours computes in (see below)
    with torch.no_grad():
        logits = peer(x)
        assert (ours(x) - logits).abs().max() <= 1e-5
        assert logits.abs().max() > 0.1  # far from zero, so the tolerance means something
        pooled = ours.forward_head(ours.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, 512)
        assert (ours.head(pooled) - logits).abs().max() <= 1e-5


def test_parity_with_torchvision_resnet18_train_step() -> None:
    """In train mode BatchNorm uses batch statistics and updates its running ones: both agree too."""
    peer, ours = _torchvision_and_ours()
    peer.train(), ours.train()
    # Ours lays its maps out channels-last; torchvision keeps the layout of its input. Given the same layout
    # both run the same oneDNN kernels, so the tolerance stays tight (on a channels-first input the peer's
    # kernels sum in another order: 3e-5 apart in train mode).
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    assert (ours(x) - peer(x)).abs().max() <= 1e-5
    ours_stats = cnn_state_dict_from_torchvision(peer.state_dict())
    for name, t in ours.state_dict().items():
        assert torch.allclose(t.float(), ours_stats[name].float(), atol=1e-6), name


def test_mapping_names() -> None:
    renamed = cnn_state_dict_from_torchvision(
        {
            "conv1.weight": torch.zeros(1),
            "bn1.running_var": torch.zeros(1),
            "layer2.0.downsample.0.weight": torch.zeros(1),
            "layer2.0.downsample.1.bias": torch.zeros(1),
            "layer4.1.bn2.weight": torch.zeros(1),
            "fc.bias": torch.zeros(1),
        }
    )
    assert sorted(renamed) == [
        "head.bias",
        "stages.1.blocks.0.shortcut.bn.bias",
        "stages.1.blocks.0.shortcut.conv.weight",
        "stages.3.blocks.1.bn2.weight",
        "stem.bn.running_var",
        "stem.conv.weight",
    ]


# (C, H, W) of every stage's map: stage 1 at the stem's resolution, then halved each stage.
STAGE_SHAPES = {
    "resnet-mini-28": [(32, 28, 28), (64, 14, 14), (128, 7, 7), (256, 4, 4)],
    "resnet-mini-64": [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)],
    "resnet-fmnist-28": [(32, 28, 28), (64, 14, 14), (128, 7, 7)],
    "resnet-fmnist-28-teacher": [(32, 28, 28), (64, 14, 14), (128, 7, 7)],
}


@pytest.mark.parametrize("name", list(CNN_PRESETS))
def test_presets_forward_backward(name: str) -> None:
    config = CNN_PRESETS[name]
    model = CNN(config)
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    final, stages = model.forward_features(x, return_stages=True)
    assert [tuple(s.shape[1:]) for s in stages] == STAGE_SHAPES[name]
    assert final is stages[-1]
    out = model.forward_head(final)
    assert out.shape == (2, config.width) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet_mini_28_size_and_grey_input() -> None:
    assert 1e6 <= sum(p.numel() for p in CNN(CNN_PRESETS["resnet-mini-28"]).parameters()) <= 3e6
    grey = CNN(CNNConfig(**{**vars(CNN_PRESETS["resnet-mini-28"]), "in_channels": 1, "num_classes": 10}))
    assert grey(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_fmnist_teacher_preset_size_and_cost() -> None:
    from vitrina.models.registry import preset_config, preset_cost

    teacher, fast = (
        preset_cost(preset_config("resnet-fmnist-28-teacher")),
        preset_cost(preset_config("resnet-fmnist-28")),
    )
    assert 0.6e6 <= teacher.parameters <= 0.75e6 and 60e6 <= teacher.macs <= 70e6  # as its comment says
    assert 1.6 <= teacher.macs / fast.macs <= 2.0


def test_learns_a_tiny_task() -> None:
    """A few optimiser steps separate two easy classes (bright vs dark images): the gradients are wired."""
    torch.manual_seed(0)
    model = CNN(CNNConfig(image_size=16, widths=(8, 16), blocks=(1, 1), num_classes=2))
    x = torch.randn(32, 3, 16, 16) * 0.1
    y = torch.arange(32) % 2
    x[y == 1] += 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.5 * losses[0]
    assert (model(x).argmax(1) == y).float().mean() == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(widths=(8, 16), blocks=(1,)), "equal length"),
        (dict(widths=(8,), blocks=(0,)), "at least one block"),
        (dict(stem_kernel=4), "odd"),
    ],
)
def test_config_rejects_shapes_that_cannot_work(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CNNConfig(**kwargs)


def test_config_json_round_trip() -> None:
    assert from_json(CNNConfig, to_json(RESNET18)) == RESNET18
