"""Build the ResNet fixtures: a small residual CNN trained on the 1x8x8 digits.

Two graphs come from the same trained weights:

* `resnet_digits.onnx`: exported in TrainingMode.EVAL, so the exporter folds every
  BatchNormalization into the Conv before it (Conv nodes gain a bias).
* `resnet_digits_bn.onnx`: exported in TrainingMode.PRESERVE from the model in eval
  mode, so BatchNormalization nodes (training_mode=0) stay after bias-free Convs, as
  in graphs that were not optimised before deployment.

Both contain residual Adds, a stride-2 block with a 1x1 Conv shortcut, a global
average pool and a final Gemm. Run as `python models/resnet_digits.py`.
"""

from __future__ import annotations

import torch
from _common import Export, TrainConfig, build
from torch import nn

LAYOUT = (1, 8, 8)
CONFIG = TrainConfig(epochs=30, lr=3e-3, weight_decay=1e-4)
EXPORTS = [Export("resnet_digits"), Export("resnet_digits_bn", fold_batchnorm=False)]


def conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    """Conv without bias (BatchNorm supplies the shift) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, plus an identity or 1x1 conv+BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout, 3, 1)
        )
        self.shortcut = (
            conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return relu(body(x) + shortcut(x))."""
        return self.relu(self.body(x) + self.shortcut(x))


def make_model() -> nn.Module:
    """Return the untrained network: stem, 16-ch block, 16->32 stride-2 block, 32-ch block."""
    return nn.Sequential(
        conv_bn(1, 16, 3, 1),
        nn.ReLU(),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        BasicBlock(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def main() -> None:
    """Train once, export both variants and verify them."""
    build(make_model, LAYOUT, CONFIG, EXPORTS)


if __name__ == "__main__":
    main()
