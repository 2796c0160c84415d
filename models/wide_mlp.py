"""A wide MLP (64-1024-1024-1024-10) trained on the digits, for the speed benchmarks.

Its matmuls are large enough that their FLOPs, not per-node overhead, set the time. It is
trained when a benchmark asks for it (2.2 M parameters: not a committed fixture) and
needs the ``models`` extra (torch).
"""

from __future__ import annotations

import numpy as np
import onnx

NAME = "wide_mlp (64-1024-1024-1024-10)"


def build() -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    """The exported model, calibration feeds (256 training samples) and the test inputs."""
    import torch
    from torch import nn

    from models import _common

    _common.seed_everything()
    split = _common.load_split((64,))
    net = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    _common.train(net, split, _common.TrainConfig(epochs=15, lr=1e-3, weight_decay=1e-4))
    model = _common.export_onnx(net, torch.from_numpy(split.x_test[:1]), fold_batchnorm=True)
    calib = {_common.INPUT_NAME: split.x_train[: 4 * _common.CALIB_SIZE]}
    return model, calib, split.x_test
