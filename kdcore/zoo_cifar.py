"""CIFAR-style ResNets and Wide ResNets of the RepDistiller / mdistiller tables, in plain torch.

The same architectures as the CRD paper's model code (RepDistiller ``models/resnet.py``, ``models/wrn.py``)
and mdistiller's copies of it (``mdistiller/models/cifar/``), written here from their description:

* ``resnet8x4`` / ``resnet32x4``: a 3x3 stem conv with 32 channels (batch norm, ReLU), then three stages of
  basic blocks (``(depth - 2) / 6`` blocks each: 1 for depth 8, 5 for depth 32) of 64, 128 and 256
  channels, the second and third stage striding by 2; a 1x1 conv + batch norm shortcut wherever the
  shape changes; global average pooling; a linear classifier.
* ``wrn_16_2`` / ``wrn_40_2``: Zagoruyko & Komodakis' pre-activation wide ResNet, depth ``6n + 4``
  (n = 2 and 6 blocks per stage), widths 16 (stem), 32, 64, 128 for widen factor 2; a 1x1 conv
  shortcut (no batch norm) where the width changes; a final batch norm + ReLU before pooling; no dropout.

Parameter counts at 100 classes (equal to the authors' models, ``test_zoo_cifar.py`` holds them):
resnet8x4 1,233,540; resnet32x4 7,433,860; wrn_16_2 703,284; wrn_40_2 2,255,156. The initialisation
is the authors' (Kaiming normal, fan-out, for the ResNets; N(0, sqrt(2 / (k*k*out))) for the WRNs; batch
norm weight 1, bias 0), which matters little once training starts.

Use them from a spec as ``model: {kind: factory, target: "kdcore.zoo_cifar:resnet32x4", kwargs:
{num_classes: 100}}``. Tap names (module paths) on 3 x 32 x 32 inputs:

| name | resnet8x4 / resnet32x4 | wrn_16_2 / wrn_40_2 |
|---|---|---|
| ``relu`` (the stem; WRN: ``conv1``) | (32, 32, 32) | (16, 32, 32) |
| ``layer1`` | (64, 32, 32) | (32, 32, 32) |
| ``layer2`` | (128, 16, 16) | (64, 16, 16) |
| ``layer3`` | (256, 8, 8) | (128, 8, 8) |
| ``embed`` (pooled, flattened) | (256,) | (128,) |
| ``fc`` (logits) | (num_classes,) | (num_classes,) |

``layer1``..``layer3`` are the authors' stage outputs ``feats[1:4]`` (after the block's ReLU for the
ResNets; for the pre-activation WRNs the residual sum, before the next batch norm, which is what
mdistiller hands its feature losses), and ``embed`` is their ``pooled_feat`` (what CRD uses). These nets
have three stages, so there is no ``layer4``. The WRNs' stages are called ``block1``..``block3`` in the
authors' code; here they are ``layer1``..``layer3`` so one spec's pairs fit every model of this module,
and the WRNs' final normalised map is ``relu`` (after ``bn1``). Every ReLU is out-of-place so a tapped
tensor is never overwritten later in the forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CifarResNet", "WideResNet", "from_authors_state_dict", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2"]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class ResBlock(nn.Module):
    """Post-activation basic block: conv-bn-relu-conv-bn, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(nn.Module):
    """RepDistiller's CIFAR ResNet with basic blocks: depth ``6n + 2``, ``widths`` = (stem, stage 1, 2, 3).

    Shapes: x (B, 3, 32, 32) -> relu (B, w0, 32, 32) -> layer1 (B, w1, 32, 32) -> layer2 (B, w2, 16, 16)
    -> layer3 (B, w3, 8, 8) -> embed (B, w3) -> fc (B, num_classes).
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a basic-block CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        c = widths[0]
        stages = []
        for i, w in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(ResBlock(c if j == 0 else w, w, stride if j == 0 else 1) for j in range(n))))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = the authors' AvgPool2d(8) on 32 x 32 inputs
        self.embed = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.embed(self.avgpool(x)))


class WideBlock(nn.Module):
    """Pre-activation wide basic block: bn-relu-conv-bn-relu-conv, plus the (1x1 conv) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(c_out, c_out)
        self.shortcut: nn.Module | None = None
        if c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        # As in the authors' block: a width change takes its shortcut from the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """Wide ResNet for CIFAR: depth ``6n + 4``, widths 16, 16k, 32k, 64k (k = ``widen_factor``), no dropout.

    Shapes: x (B, 3, 32, 32) -> conv1 (B, 16, 32, 32) -> layer1 (B, 16k, 32, 32) -> layer2 (B, 32k, 16, 16)
    -> layer3 (B, 64k, 8, 8) -> relu (after bn1) -> embed (B, 64k) -> fc (B, num_classes).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = _conv3x3(3, widths[0])
        c = widths[0]
        stages = []
        for i, w in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(WideBlock(c if j == 0 else w, w, stride if j == 0 else 1) for j in range(n))))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.embed(self.avgpool(x)))


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """The CRD/DKD tables' student: 1 block per stage, 32-64-128-256 channels (1.23M params at 100 classes)."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """The CRD/DKD tables' teacher: 5 blocks per stage, 32-64-128-256 channels (7.43M params at 100 classes)."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes=num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2: 2 blocks per stage, widen factor 2 (0.70M params at 100 classes)."""
    return WideResNet(16, 2, num_classes=num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2: 6 blocks per stage, widen factor 2 (2.26M params at 100 classes)."""
    return WideResNet(40, 2, num_classes=num_classes)


def from_authors_state_dict(state: dict) -> dict:
    """A RepDistiller / mdistiller CIFAR checkpoint's state dict with this module's key names.

    Accepts the bare state dict or their checkpoint file's ``{"model": state_dict, ...}``, and drops a
    ``module.`` (DataParallel) prefix. The ResNets' keys are the same as here; the WRNs'
    ``block<i>.layer.<j>.`` become ``layer<i>.<j>.`` and ``convShortcut`` becomes ``shortcut``. Values
    are not copied. Save the result with safetensors to use it as ``teacher.checkpoint``.
    """
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    out = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        for i in (1, 2, 3):
            prefix = f"block{i}.layer."
            if k.startswith(prefix):
                k = f"layer{i}." + k[len(prefix):]
        out[k.replace(".convShortcut.", ".shortcut.")] = value
    return out
