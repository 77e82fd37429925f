"""MobileNetV2 (Sandler et al., 2018) in PyTorch, with torchvision's parameter names, so that torchvision's
ImageNet state dict (IMAGENET1K_V1) loads as is. Defined here because the PyPI torchvision wheels need a
CUDA build of torch and do not import beside the CPU one these machines install.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
FEATURES = 1280


def conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = [] if expand == 1 else [conv_bn_relu(inp, hidden, kernel=1)]
        layers += [
            conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),  # pointwise, linear
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(conv_bn_relu(inp, FEATURES, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURES, classes))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The 1280-d global-average-pooled features the classifier reads."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(x))


class FeaturesAndLogits(nn.Module):
    """What the exported graph computes: L2-normalised pooled features (the embedding) and ImageNet logits
    (kept as a check that the weights are the right ones)."""

    def __init__(self, net: MobileNetV2) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.net.pooled(pixels)
        return nn.functional.normalize(pooled, p=2.0, dim=1), self.net.classifier(pooled)


def load_imagenet(weights: Any) -> MobileNetV2:
    """MobileNetV2 with torchvision's IMAGENET1K_V1 weights (a state dict loaded with `torch.load`)."""
    net = MobileNetV2()
    net.load_state_dict(weights, strict=True)
    return net.eval()
