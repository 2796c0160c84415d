"""The op-type weights ``c_m`` of the paper's weighted FS distance (eq. 9), as a target's
cost model implies them.

The paper states ``c_conv = 1.2`` on Ascend and ``1.5`` on MLU without saying where the
numbers come from. Here ``c_m`` is what an operator of type ``m`` costs per MAC relative
to a matmul doing the same GEMM: the predicted cycles of its kernels (for a conv, the
im2col kernel and the GEMM) divided by the cycles of one GEMM of the same shape. It
depends on the layer (``bench/targets.py``, part D, prints it for several); the default
is a ResNet-sized 3 x 3 layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from hw_targets.base import Target, TargetModule
from hw_targets.lower import lower_conv, lower_matmul
from hw_targets.spec import GemmSpec

__all__ = ["ConvLayer", "conv_weight", "op_type_weights"]


@dataclass(frozen=True)
class ConvLayer:
    """A 2-D conv layer: NCHW input shape, output channels, square kernel, same padding."""

    x_shape: tuple[int, int, int, int] = (1, 64, 56, 56)
    out_channels: int = 64
    kernel: int = 3


def conv_weight(module: TargetModule, target: Target, layer: ConvLayer = ConvLayer()) -> float:
    """Predicted cycles of ``layer`` over those of a matmul with its GEMM shape."""
    pad = layer.kernel // 2
    conv = lower_conv(module, target, "conv", layer.x_shape, layer.out_channels,
                      (layer.kernel, layer.kernel), pads=(pad, pad, pad, pad))
    gemm = conv.specs[-1]
    assert isinstance(gemm, GemmSpec)
    same = lower_matmul(module, target, "gemm", gemm.m, gemm.k, gemm.n * gemm.batch, True)
    return conv.cycles() / same.cycles()


def op_type_weights(module: TargetModule, target: Target | None = None,
                    layer: ConvLayer = ConvLayer()) -> dict[str, float]:
    """``c_m`` by ONNX op type for :func:`qmpass.spectral.weighted_fs` (matmuls are 1)."""
    target = module.TARGET if target is None else target
    return {"MatMul": 1.0, "Gemm": 1.0, "Conv": conv_weight(module, target, layer)}
