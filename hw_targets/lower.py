"""From an operator's shapes to the kernels that compute it on a target.

A MatMul/Gemm ``y = x @ W + b`` (``x`` flattened to ``m x k`` rows) is one GEMM with
``A = x``, ``B = W`` and a per-column bias. A convolution is, per image and group,
``y = W_g @ cols + b_g`` (``W_g`` is ``Cout/g x Cin/g*kh*kw``, ``cols`` the im2col matrix
written by a first kernel), so ``y`` comes out in NCHW with no transpose. A 1 x 1,
stride-1, unpadded convolution skips the im2col: its input already is ``cols``.

The weights are laid out on the host at lowering time (transposed ``Gemm`` weights
become row-major ``B``), as a compiler does with constants; activations are never
touched outside a kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hw_targets.base import Cost, Target, TargetModule, Tiling, roofline
from hw_targets.sim import Argument, Launch, SimResult, run
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec, Operand

__all__ = ["Lowering", "lower_conv", "lower_matmul"]


@dataclass(frozen=True)
class Lowering:
    """The kernels of one operator on one target, with their tilings and costs."""

    name: str
    module: TargetModule
    target: Target
    specs: tuple[KernelSpec, ...]
    tilings: tuple[Tiling | None, ...]
    arguments: tuple[Argument, ...]
    arg_names: tuple[tuple[str, ...], ...]
    output_shape: tuple[int, ...]

    @property
    def launches(self) -> tuple[Launch, ...]:
        return tuple(
            Launch(self.module.emit(spec, tiling, self.target), args)
            for spec, tiling, args in zip(self.specs, self.tilings, self.arg_names, strict=True)
        )

    def costs(self) -> tuple[Cost, ...]:
        return tuple(
            self.module.cost(spec, tiling, self.target)
            for spec, tiling in zip(self.specs, self.tilings, strict=True)
        )

    def cycles(self) -> int:
        return sum(c.cycles for c in self.costs())

    def roofline(self) -> int:
        """The roofline of the operator's GEMM (im2col traffic is lowering overhead)."""
        return sum(roofline(s, self.target) for s in self.specs if isinstance(s, GemmSpec))

    def simulate(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, SimResult]:
        """Compile and run the kernels; the output in the operator's layout."""
        result = run(self.module, self.target, self.arguments, self.launches, feeds, ("c",))
        return result.outputs["c"].reshape(self.output_shape), result


def _tiling(module: TargetModule, target: Target, spec: KernelSpec) -> Tiling | None:
    return module.tiling(spec, target) if isinstance(spec, GemmSpec) else None


def lower_matmul(
    module: TargetModule,
    target: Target,
    name: str,
    rows: int,
    k: int,
    n: int,
    bias: bool,
) -> Lowering:
    """``c = a @ b (+ bias)`` with ``a`` the ``rows x k`` activations, ``b`` the weight."""
    spec = GemmSpec(name, rows, k, n, bias="col" if bias else "none")
    return Lowering(
        name,
        module,
        target,
        (spec,),
        (_tiling(module, target, spec),),
        (
            Argument("a", target.in_dtype, rows * k),
            Argument("b", target.in_dtype, k * n),
            Argument("bias", "float", max(1, n if bias else 1)),
            Argument("c", "float", rows * n),
        ),
        (("a", "b", "bias", "c"),),
        (rows, n),
    )


def lower_conv(
    module: TargetModule,
    target: Target,
    name: str,
    x_shape: tuple[int, int, int, int],
    out_channels: int,
    kernel: tuple[int, int],
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    groups: int = 1,
    bias: bool = True,
) -> Lowering:
    """A 2-D convolution of NCHW ``x``; feeds are ``a`` (the OIHW weight), ``x``, ``bias``."""
    images, channels, height, width = x_shape
    im2col = Im2colSpec(f"{name}_im2col", images, channels, height, width, kernel, strides,
                        pads, dilations, groups)
    ho, wo = im2col.out_hw
    m, kk, hw = out_channels // groups, im2col.k, ho * wo
    gemm = GemmSpec(
        f"{name}_gemm",
        m,
        kk,
        hw,
        batch=images * groups,
        a=Operand(groups, m * kk),
        b=Operand(images * groups, kk * hw),
        c=Operand(images * groups, m * hw),
        bias="row" if bias else "none",
        bias_operand=Operand(groups, m),
    )
    pointwise = kernel == (1, 1) and strides == (1, 1) and not any(pads)
    arguments = [
        Argument("a", target.in_dtype, out_channels * kk),
        Argument("x", target.in_dtype, images * channels * height * width),
        Argument("bias", "float", out_channels if bias else 1),
        Argument("c", "float", images * out_channels * hw),
    ]
    specs: tuple[KernelSpec, ...]
    arg_names: tuple[tuple[str, ...], ...]
    if pointwise:
        specs, arg_names = (gemm,), (("a", "x", "bias", "c"),)
    else:
        arguments.append(Argument("cols", target.in_dtype, im2col.sizes()["cols"]))
        specs = (im2col, gemm)
        arg_names = (("x", "cols"), ("a", "cols", "bias", "c"))
    return Lowering(
        name,
        module,
        target,
        specs,
        tuple(_tiling(module, target, s) for s in specs),
        tuple(arguments),
        arg_names,
        (images, out_channels, ho, wo),
    )
