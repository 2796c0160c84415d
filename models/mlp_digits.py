"""Build models/mlp_digits.onnx: an MLP 64 -> 128 -> 64 -> 10 trained on the digits.

The simplest real-framework graph: three Linear layers on a 2-D input, which the
TorchScript exporter writes as Gemm nodes with transB=1 (weights stored d_out x d_in).
Run as `python models/mlp_digits.py`.
"""

from __future__ import annotations

from _common import Export, TrainConfig, build
from torch import nn

NAME = "mlp_digits"
LAYOUT = (64,)
CONFIG = TrainConfig(epochs=60, lr=2e-3, weight_decay=1e-4)


def make_model() -> nn.Module:
    """Return the untrained MLP (ReLU between the layers)."""
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def main() -> None:
    """Train, export and verify the fixture."""
    build(make_model, LAYOUT, CONFIG, [Export(NAME)])


if __name__ == "__main__":
    main()
