"""A small ResNet (He et al., 2016): the convolutional baseline and teacher next to the transformers.

image -> stem (conv k x k, stride s -> BN -> ReLU [-> 3x3 max-pool, stride 2])
      -> stages of basic residual blocks (stage 1 keeps the resolution, each later one halves it
         with a stride-2 first block and doubles the width)
      -> global average pool -> head

A basic block is ``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``; the shortcut is the
identity, or a strided 1x1 conv + BN where the shape changes. For small images the stem is one 3x3
conv at stride 1 and no pooling (the CIFAR recipe); ``stem_kernel=7, stem_stride=2, stem_pool=True``
with widths 64-128-256-512 and 2 blocks per stage is torchvision's ``resnet18`` layer for layer, and
``cnn_state_dict_from_torchvision`` maps its weights onto this class.

Maps have the shape (B, C, H, W) throughout, but are laid out channels-last in memory (the input is
converted once, the convolutions keep the layout): oneDNN's CPU convolutions run faster that way. A
forward+backward step of resnet-fmnist-28-teacher at batch 128 on two AVX-512 cores went from 351 to
516 img/s in float32 and from 752 to 910 under bf16 autocast (2026-12-03).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CNNConfig:
    """Shape of a ResNet of basic blocks: stage i has ``widths[i]`` channels and ``blocks[i]`` blocks.

    ``image_size`` is the size the presets are meant for (and that transforms resize to); the network
    itself takes any size. ``num_classes=0`` means no classifier head (``forward`` returns pooled features).
    """

    image_size: int = 28
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    stem_kernel: int = 3
    stem_stride: int = 1
    stem_pool: bool = False
    num_classes: int = 0

    def __post_init__(self) -> None:
        self.widths, self.blocks = tuple(self.widths), tuple(self.blocks)  # JSON gives lists
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} must be non-empty and of equal length")
        if min(self.blocks) < 1:
            raise ValueError(f"every stage needs at least one block, got blocks {self.blocks}")
        if self.stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be odd (padding keeps the map centred), got {self.stem_kernel}")

    @property
    def width(self) -> int:
        """Channels of the last stage, i.e. of the pooled features."""
        return self.widths[-1]


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free ``kernel x kernel`` conv with 'same' padding and the BatchNorm that follows it."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(out_channels)


class Shortcut(nn.Module):
    """Strided 1x1 conv + BN: the residual path of a block whose resolution or width changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv, self.bn = conv_bn(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """``(B, C_in, H, W) -> (B, C_out, H/stride, W/stride)``: two 3x3 conv-BN with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2, self.bn2 = conv_bn(out_channels, out_channels, 3)
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = Shortcut(in_channels, out_channels, stride) if reshape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Stem(nn.Module):
    """``(B, C_in, H, W) -> (B, widths[0], H/s, W/s)``: conv -> BN -> ReLU, then an optional 3x3/2 max-pool."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        c = config
        self.conv, self.bn = conv_bn(c.in_channels, c.widths[0], c.stem_kernel, c.stem_stride)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if c.stem_pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.bn(self.conv(x))))


class CNNStage(nn.Module):
    """``blocks`` basic blocks; the first one changes width and, with ``stride=2``, halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            BasicBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
            for i in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class CNN(nn.Module):
    """ResNet of basic blocks: ``forward_features`` -> (B, C, H', W') map, ``forward_head`` -> pooled/logits."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.stem = Stem(c)
        in_widths = (c.widths[0], *c.widths[:-1])
        self.stages = nn.ModuleList(
            CNNStage(cin, cout, n, stride=1 if i == 0 else 2)
            for i, (cin, cout, n) in enumerate(zip(in_widths, c.widths, c.blocks, strict=True))
        )
        self.head = nn.Linear(c.width, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def width(self) -> int:
        """Width of the pooled features (``forward_head(..., pre_logits=True)``)."""
        return self.config.width

    def reset_parameters(self) -> None:
        """torchvision's ResNet init: He-normal convs (fan-out, ReLU gain), BN at weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(
        self, pixels: torch.Tensor, return_stages: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C_in, H, W) -> (B, C, H', W') last stage's map; with ``return_stages`` also every stage's map."""
        x = self.stem(pixels.to(memory_format=torch.channels_last))
        stage_maps = []
        for stage in self.stages:
            x = stage(x)
            stage_maps.append(x)
        return (x, stage_maps) if return_stages else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> average-pooled (B, C) if ``pre_logits`` else head output (B, num_classes or C)."""
        x = x.mean(dim=(2, 3))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))


def cnn_state_dict_from_torchvision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ``ResNet`` (basic blocks) state dict, renamed for ``CNN``; the tensors are used as they are.

    ``conv1``/``bn1`` -> ``stem.conv``/``stem.bn``; ``layerK.j`` -> ``stages.{K-1}.blocks.j``;
    ``downsample.0``/``.1`` -> ``shortcut.conv``/``.bn``; ``fc`` -> ``head``. BatchNorm running
    statistics travel with the weights.
    """
    renamed = {}
    for name, tensor in state_dict.items():
        first, _, rest = name.partition(".")
        if first in ("conv1", "bn1"):
            name = f"stem.{first[:-1]}.{rest}"
        elif first == "fc":
            name = f"head.{rest}"
        elif first.startswith("layer"):
            block, _, rest = rest.partition(".")
            rest = rest.replace("downsample.0.", "shortcut.conv.").replace("downsample.1.", "shortcut.bn.")
            name = f"stages.{int(first.removeprefix('layer')) - 1}.blocks.{block}.{rest}"
        renamed[name] = tensor
    return renamed


CNN_PRESETS: dict[str, CNNConfig] = {
    # ResNet-18's layout at half width with a 3x3 stride-1 stem: maps 28, 14, 7, 4;
    # 2.8M parameters, 115M MACs per image.
    "resnet-mini-28": CNNConfig(image_size=28, widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2)),
    # The same at 64 x 64, with a stride-2 stem so the first stage runs at 32 x 32 (maps 32, 16, 8, 4);
    # 2.8M parameters, 139M MACs per image.
    "resnet-mini-64": CNNConfig(image_size=64, widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2), stem_stride=2),
    # A fast Fashion-MNIST teacher: one block per stage, three stages (maps 28, 14, 7); 0.31M parameters,
    # about 2.5x resnet-mini-28's training img/s on two cores, so a 15-minute cap holds ~14 epochs.
    "resnet-fmnist-28": CNNConfig(image_size=28, widths=(32, 64, 128), blocks=(1, 1, 1)),
    # The stronger teacher, aimed at >= 94% in a 20-minute cap (--precision bf16, the default crop/flip/erasing
    # and label smoothing; not yet measured): a second block in the 14 x 14 and 7 x 7 stages, one at 28 x 28
    # where activations are largest. 0.68M parameters, 67M MACs per image (1.8x resnet-fmnist-28); float32
    # forward+backward at batch 128 measured 0.59x resnet-fmnist-28's img/s on a shared 2-core machine.
    "resnet-fmnist-28-teacher": CNNConfig(image_size=28, widths=(32, 64, 128), blocks=(1, 2, 2)),
}
