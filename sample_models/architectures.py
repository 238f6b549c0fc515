"""Small reference architectures for scikit-learn's bundled digits data set.

Every model takes float32 input of shape ``[N, 1, 8, 8]`` (pixel values of
``sklearn.datasets.load_digits`` divided by 16.0) and returns logits of shape
``[N, 10]``.  All models are deliberately tiny (well below 100k parameters)
so that the exported files can be committed and training takes only seconds
on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "LeNet", "ResNet", "MobileNet", "ARCHITECTURES"]


class MLP(nn.Module):
    """Plain multi-layer perceptron: 64 -> 128 -> 64 -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 128)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet(nn.Module):
    """LeNet-style CNN: two conv/ReLU/max-pool stages and a two-layer head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)  # 16x8x8
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 16x4x4
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)  # 32x4x4
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 32x2x2
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3+BN, identity (or 1x1 conv+BN) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Tiny ResNet: stem (16 ch, 8x8) + blocks 16 -> 32/s2 (4x4) -> 48/s2 (2x2)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.layer1 = BasicBlock(16, 16, stride=1)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 48, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation: avg-pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid -> scale."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)
        self.dw_bn = nn.BatchNorm2d(in_ch)
        self.dw_relu = nn.ReLU()
        self.pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out_ch)
        self.pw_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw_relu(self.dw_bn(self.dw(x)))
        return self.pw_relu(self.pw_bn(self.pw(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3-style block: 1x1 expand, depthwise 3x3, SE, 1x1 project, residual add."""

    def __init__(self, channels: int, expand: int = 2, se_squeeze: int = 8) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.expand_relu = nn.ReLU()
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.dw_relu = nn.ReLU()
        self.se = SqueezeExcitation(hidden, se_squeeze)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand_relu(self.expand_bn(self.expand(x)))
        out = self.dw_relu(self.dw_bn(self.dw(out)))
        out = self.se(out)
        out = self.project_bn(self.project(out))
        return x + out


class MobileNet(nn.Module):
    """Tiny MobileNet: stem, depthwise-separable blocks, inverted residuals with SE."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )  # 16x8x8
        self.block1 = DepthwiseSeparable(16, 32)  # 32x8x8
        self.block2 = DepthwiseSeparable(32, 48, stride=2)  # 48x4x4
        self.block3 = InvertedResidual(48, expand=2, se_squeeze=12)  # 48x4x4
        self.block4 = DepthwiseSeparable(48, 64, stride=2)  # 64x2x2
        self.block5 = InvertedResidual(64, expand=2, se_squeeze=16)  # 64x2x2
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = self.block4(x)
        x = self.block5(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "resnet": ResNet,
    "mobilenet": MobileNet,
}
