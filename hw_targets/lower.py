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

import functools
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hw_targets.base import KernelCost, Target, TargetModule, Tiling, roofline
from hw_targets.sim import CXXFLAGS, INCLUDE_DIR, Argument, Launch, SimResult, harness_source, run
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec, Operand

__all__ = [
    "Lowering",
    "gemm_error_bound", "lower_conv", "lower_matmul", "simulate_all", "write_bundle"]


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

    @functools.cached_property
    def launches(self) -> tuple[Launch, ...]:
        """The emitted kernels with their arguments (emitted once per lowering)."""
        return tuple(
            Launch(self.module.emit(spec, tiling, self.target), args)
            for spec, tiling, args in zip(self.specs, self.tilings, self.arg_names, strict=True)
        )

    def costs(self) -> tuple[KernelCost, ...]:
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
        ((output, counters),) = simulate_all([self], [feeds])
        return output, SimResult({"c": output}, counters)

    def prefixed(self) -> tuple[tuple[Argument, ...], tuple[Launch, ...]]:
        """Arguments and launches with names prefixed by the operator's, so that several
        operators share one program."""
        arguments = tuple(
            Argument(f"{self.name}_{a.name}", a.dtype, a.count) for a in self.arguments
        )
        launches = tuple(
            Launch(launch.kernel, tuple(f"{self.name}_{arg}" for arg in launch.args))
            for launch in self.launches
        )
        return arguments, launches

    def error_bound(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Elementwise bound on ``|kernel - exact|`` in the operator's output layout.

        :func:`gemm_error_bound` of the GEMM's operands (for a conv, the weight and the
        im2col matrix) and its bias.
        """
        gemm = self.specs[-1]
        assert isinstance(gemm, GemmSpec)
        if len(self.specs) == 1 and "x" not in feeds:  # a matmul: c = a @ b
            a = np.asarray(feeds["a"], np.float64).reshape(1, gemm.m, gemm.k)
            b = np.asarray(feeds["b"], np.float64).reshape(1, gemm.k, gemm.n)
        else:  # a conv: c[img, g] = a[g] @ cols[img, g]
            groups = gemm.a.period
            a = np.asarray(feeds["a"], np.float64).reshape(groups, gemm.m, gemm.k)
            a = np.tile(a, (gemm.batch // groups, 1, 1))
            b = _cols(self.specs[0], np.asarray(feeds["x"], np.float64)) \
                if isinstance(self.specs[0], Im2colSpec) else \
                np.asarray(feeds["x"], np.float64).reshape(gemm.batch, gemm.k, gemm.n)
        bias = None
        if gemm.bias != "none":
            bias = np.asarray(feeds["bias"], np.float64)
            if gemm.bias == "row":  # batch b adds bias[(b % groups) * m + row]
                period = gemm.bias_operand.period
                bias = bias.reshape(period, gemm.m)[np.arange(gemm.batch) % period][:, :, None]
        return gemm_error_bound(a, b, self.target.in_dtype, bias).reshape(self.output_shape)


_F16_UNIT = 2.0**-11
_F16_TINY = 2.0**-25
_F32_UNIT = 2.0**-24


def gemm_error_bound(
    a: np.ndarray, b: np.ndarray, dtype: str, bias: np.ndarray | None = None
) -> np.ndarray:
    """Elementwise bound on ``|kernel(a @ b + bias) - (a @ b + bias)|`` (batched ``a``,
    ``b`` allowed; ``bias`` broadcast against the output).

    Inputs rounded to ``dtype`` (fp16: ``|fl(v) - v| <= max(u|v|, 2^-25)``, fp32 inputs
    are exact), products summed in fp32 by the kernel and by an fp32 reference:
    ``|A| e_B + e_A |B| + e_A e_B + 2 gamma_(k+2) (|A| + e_A)(|B| + e_B)``, plus the
    rounding of the fp32 bias add on both sides.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ea, eb = _rounding(a, dtype), _rounding(b, dtype)
    k = a.shape[-1]
    gamma = 2 * (k + 2) * _F32_UNIT / (1 - (k + 2) * _F32_UNIT)
    bound = (np.abs(a) @ eb + ea @ np.abs(b) + ea @ eb
             + gamma * ((np.abs(a) + ea) @ (np.abs(b) + eb)))
    if bias is not None:
        bound = bound + 4 * _F32_UNIT * np.abs(np.asarray(bias, np.float64))
    return bound


def _rounding(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float":
        return np.zeros_like(x)
    return np.maximum(_F16_UNIT * np.abs(x), _F16_TINY)


def _cols(spec: KernelSpec, x: np.ndarray) -> np.ndarray:
    """The im2col matrices ``[images * groups, K, Ho * Wo]`` of ``x`` (numpy, for bounds)."""
    assert isinstance(spec, Im2colSpec)
    top, left, bottom, right = spec.pads
    x = x.reshape(spec.images, spec.channels, spec.height, spec.width)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    ho, wo = spec.out_hw
    taps = np.empty((spec.images, spec.channels, kh, kw, ho, wo))
    for i in range(kh):
        for j in range(kw):
            taps[:, :, i, j] = padded[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh,
                                      j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return taps.reshape(spec.images * spec.groups, spec.k, ho * wo)


def _program(
    lowerings: Sequence[Lowering], feeds: Sequence[Mapping[str, np.ndarray]]
) -> tuple[list[Argument], list[Launch], dict[str, np.ndarray], tuple[str, ...]]:
    arguments: list[Argument] = []
    launches: list[Launch] = []
    inputs: dict[str, np.ndarray] = {}
    for lowering, feed in zip(lowerings, feeds, strict=True):
        args, runs = lowering.prefixed()
        arguments += args
        launches += runs
        inputs.update({f"{lowering.name}_{k}": np.asarray(v) for k, v in feed.items()})
    outputs = tuple(f"{lowering.name}_c" for lowering in lowerings)
    return arguments, launches, inputs, outputs


def simulate_all(
    lowerings: Sequence[Lowering], feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[tuple[np.ndarray, list[dict[str, object]]]]:
    """Run several operators' kernels in one program (one compile); per operator its
    output (in its layout) and the cycle counters of its kernels, in launch order."""
    if not lowerings:
        return []
    arguments, launches, inputs, outputs = _program(lowerings, feeds)
    result = run(lowerings[0].module, lowerings[0].target, arguments, launches, inputs, outputs)
    done, at = [], 0
    for lowering in lowerings:
        count = len(lowering.specs)
        done.append((result.outputs[f"{lowering.name}_c"].reshape(lowering.output_shape),
                     result.counters[at: at + count]))
        at += count
    return done


def write_bundle(
    lowerings: Sequence[Lowering], feeds: Sequence[Mapping[str, np.ndarray]], directory: Path
) -> None:
    """Write what builds and runs the kernels without Python into ``directory``:
    ``kernels/<kernel>.cc`` (the emitted source), ``include/`` (the simulation headers),
    ``sim_main.cc`` (the harness), ``data/`` (the inputs, float32) and ``build.sh``
    (compiles, runs, prints one JSON line of cycle counters per kernel)."""
    module, target = lowerings[0].module, lowerings[0].target
    for sub in ("kernels", "include", "data"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    arguments, launches, inputs, outputs = _program(lowerings, feeds)
    for launch in launches:
        (directory / "kernels" / f"{launch.kernel.name}.cc").write_text(launch.kernel.code)
    for header in ("qmsim.h", module.HEADER):
        shutil.copyfile(INCLUDE_DIR / header, directory / "include" / header)
    for name, value in inputs.items():
        np.ascontiguousarray(value, dtype=np.float32).tofile(directory / "data" / f"{name}.bin")
    source = harness_source(module, target, arguments, launches, tuple(inputs), outputs,
                            include_kernels=True)
    (directory / "sim_main.cc").write_text(source)
    script = directory / "build.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"# Builds the simulated {target.name} kernels ({target.dialect}) and runs them on\n"
        "# data/: results go to data/*.out, one JSON line of cycle counters per kernel.\n"
        "set -e\n"
        'cd "$(dirname "$0")"\n'
        f'${{CXX:-g++}} {" ".join(CXXFLAGS)} -I include sim_main.cc -o sim\n'
        "./sim data\n"
    )
    script.chmod(0o755)


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
