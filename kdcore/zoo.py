"""Small models kd defines itself, so tests and the demo need no model hub.

Use them from a spec as ``model: {kind: factory, target: "kdcore.zoo:digits_cnn", kwargs: {width: 32}}``.
Tap points worth knowing: ``block1``..``block3`` (feature maps), ``embed`` (the pooled vector before the
classifier) and ``fc`` (the logits).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """A CNN for 1 x 8 x 8 inputs (scikit-learn digits). ``width`` scales every layer.

    Shapes: x (B, 1, 8, 8) -> block1 (B, w, 8, 8) -> block2 (B, 2w, 4, 4) -> block3 (B, 4w, 4, 4)
    -> embed (B, 4w) -> fc (B, num_classes).
    """

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.block1 = _conv_bn(in_channels, width)
        self.block2 = nn.Sequential(_conv_bn(width, 2 * width), nn.MaxPool2d(2))
        self.block3 = _conv_bn(2 * width, 4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], 1, 8, 8)
        return self.fc(self.embed(self.pool(self.block3(self.block2(self.block1(x))))))


def digits_cnn(width: int = 32, num_classes: int = 10) -> DigitsCNN:
    """The digits CNN; width 32 (~94k parameters) is the demo's teacher, width 4 (~2k) its student."""
    return DigitsCNN(width=width, num_classes=num_classes)


class ImageCNN(DigitsCNN):
    """A small CNN for RGB images of any size: a strided stem (``stem_stride``), then DigitsCNN's blocks.

    Shapes: x (B, C, H, W) -> stem (B, w, H/s, W/s) -> block1 .. block3 -> embed (B, 4w) -> fc. For tests and
    benchmarks on generated images (cheap enough to run on a CPU at 64 x 64)."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 3, stem_stride: int = 4) -> None:
        super().__init__(width, num_classes, in_channels=width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, stem_stride, stem_stride, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.stem(x))


def image_cnn(width: int = 8, num_classes: int = 10, in_channels: int = 3, stem_stride: int = 4) -> ImageCNN:
    return ImageCNN(width, num_classes, in_channels, stem_stride)


class MLP(nn.Module):
    """A plain MLP on flat vectors; tap points ``hidden`` (after the last activation) and ``fc``."""

    def __init__(self, in_dim: int = 64, hidden: int = 32, num_classes: int = 10, depth: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(x))


def mlp(in_dim: int = 64, hidden: int = 32, num_classes: int = 10, depth: int = 1) -> MLP:
    return MLP(in_dim, hidden, num_classes, depth)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet (3 stages of basic blocks) on 3 x 32 x 32 inputs.

    ``resnet8x4`` = one block per stage, widths 64/128/256 after a 32-channel stem, as in the CRD paper's
    student. Tap points: ``layer1``..``layer3`` (maps), ``embed`` (B, 256), ``fc``.
    """

    def __init__(self, blocks: int = 1, widths: tuple[int, int, int, int] = (32, 64, 128, 256), num_classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages = []
        c = widths[0]
        for i, w in enumerate(widths[1:]):
            layer = [_BasicBlock(c if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(blocks)]
            stages.append(nn.Sequential(*layer))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.embed(self.pool(x)))


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(blocks=1, widths=(32, 64, 128, 256), num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(blocks=5, widths=(32, 64, 128, 256), num_classes=num_classes)
