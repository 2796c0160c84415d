"""The kernels that lowering produces, as plain shapes (no ONNX, no target).

Every weight operator lowers to a batched GEMM, ``C[b] = A[b] @ B[b] (+ bias)``, with
row-major operands in global memory: a MatMul/Gemm row block is ``x @ W`` (bias per
column); a convolution is ``W_g @ cols`` per image and group (bias per row), where
``cols`` is the Caffe-style im2col matrix ``[K = Cin/g * kh * kw, Ho * Wo]`` written by an
:class:`Im2colSpec` kernel (skipped for 1 x 1 stride-1 unpadded convolutions, where the
input already is ``cols``). Batch ``b`` reads operand ``X`` at element offset
``(b % X.period) * X.stride``, which covers shared weights (period 1), per-group weights
(period = groups) and per-image activations (period = batch).

Inputs ``A``, ``B`` and ``x`` are in the target's input dtype (fp16 on the NPU styles,
fp32 on cpu); ``bias`` and ``C`` are fp32, as the cube/matrix units accumulate in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["GemmSpec", "Im2colSpec", "KernelSpec", "Operand"]


@dataclass(frozen=True)
class Operand:
    """Where batch ``b`` finds its matrix: element offset ``(b % period) * stride``."""

    period: int
    stride: int

    def offset(self, b: int) -> int:
        return (b % self.period) * self.stride


@dataclass(frozen=True)
class GemmSpec:
    """``C[b] = A[b] @ B[b] (+ bias[b])`` for ``b < batch``; A is m x k, B is k x n."""

    name: str
    m: int
    k: int
    n: int
    batch: int = 1
    a: Operand = Operand(1, 0)
    b: Operand = Operand(1, 0)
    c: Operand = Operand(1, 0)
    bias: Literal["none", "row", "col"] = "none"
    bias_operand: Operand = Operand(1, 0)

    def __post_init__(self) -> None:
        if min(self.m, self.k, self.n, self.batch) < 1:
            raise ValueError(f"empty GEMM {self.m}x{self.k}x{self.n} (batch {self.batch})")

    @property
    def macs(self) -> int:
        return self.batch * self.m * self.k * self.n

    def sizes(self) -> dict[str, int]:
        """Elements of each global-memory argument."""
        bias_len = {"none": 0, "row": self.m, "col": self.n}[self.bias]
        return {
            "a": self.a.period * self.m * self.k,
            "b": self.b.period * self.k * self.n,
            "bias": max(1, self.bias_operand.period * bias_len),
            "c": self.batch * self.m * self.n,
        }

    def compulsory_bytes(self, in_bytes: int) -> int:
        """Bytes every input is read and every output written once."""
        sizes = self.sizes()
        bias = sizes["bias"] if self.bias != "none" else 0
        return (sizes["a"] + sizes["b"]) * in_bytes + (bias + sizes["c"]) * 4


@dataclass(frozen=True)
class Im2colSpec:
    """``cols[img][g] = im2col(x[img, g-th channel block])``: ``[K, Ho*Wo]`` per group.

    ``x`` is NCHW; ``pads`` are (top, left, bottom, right) as in ONNX; padding reads 0.
    """

    name: str
    images: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        top, left, bottom, right = self.pads
        ho = (self.height + top + bottom - dh * (kh - 1) - 1) // sh + 1
        wo = (self.width + left + right - dw * (kw - 1) - 1) // sw + 1
        return ho, wo

    @property
    def k(self) -> int:
        """Rows of one group's cols matrix: ``Cin/g * kh * kw``."""
        return self.channels // self.groups * self.kernel[0] * self.kernel[1]

    @property
    def macs(self) -> int:
        return 0

    def sizes(self) -> dict[str, int]:
        ho, wo = self.out_hw
        return {
            "x": self.images * self.channels * self.height * self.width,
            "cols": self.images * self.groups * self.k * ho * wo,
        }

    def compulsory_bytes(self, in_bytes: int) -> int:
        sizes = self.sizes()
        return (sizes["x"] + sizes["cols"]) * in_bytes


KernelSpec = GemmSpec | Im2colSpec
