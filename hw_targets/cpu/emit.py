"""The cpu target's emitter: plain-C kernels filled in from ``templates/cpu/``.

The kernels call the ``qm_*`` helpers of ``include/cpu_sim.h``; the bias epilogue is a
template of its own, added only when the GEMM has a bias.
"""

from __future__ import annotations

from hw_targets.base import KernelSource, Target, Tiling, by_kind, pipe_names
from hw_targets.cpu.target import PIPES, TARGET
from hw_targets.render import render
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["emit", "launch"]


def emit(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelSource:
    """The kernel's C source (the entry point is ``<name>::kernel``)."""
    return by_kind(spec, tiling, _emit_gemm, _emit_im2col)


def _emit_gemm(spec: GemmSpec, tiling: Tiling) -> KernelSource:
    bias = ""
    if spec.bias != "none":
        row = spec.bias == "row"
        bias = "\n" + render("cpu", "bias.cc", period=spec.bias_operand.period,
                             stride=spec.bias_operand.stride,
                             offset="i * TM" if row else "j * TN",
                             row=int(row)).rstrip("\n")
    code = render(
        "cpu", "gemm.cc",
        name=spec.name, plus_bias=" + bias" if spec.bias != "none" else "", batch=spec.batch,
        m=spec.m, k=spec.k, n=spec.n, tm=tiling.tile_m, tn=tiling.tile_n, tk=tiling.tile_k,
        pa=spec.a.period, sa=spec.a.stride, pb=spec.b.period, sb=spec.b.stride,
        pc=spec.c.period, sc=spec.c.stride, bias=bias,
    )
    return KernelSource(spec.name, code, ("a", "b", "bias", "c"))


def _emit_im2col(spec: Im2colSpec) -> KernelSource:
    ho, wo = spec.out_hw
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    code = render(
        "cpu", "im2col.cc",
        name=spec.name, images=spec.images, channels=spec.channels, height=spec.height,
        width=spec.width, kh=kh, kw=kw, groups=spec.groups, k=spec.k, hw=ho * wo, ho=ho,
        wo=wo, sh=sh, sw=sw, top=spec.pads[0], left=spec.pads[1], dh=dh, dw=dw,
    )
    return KernelSource(spec.name, code, ("x", "cols"))


def launch(kernel: KernelSource, args: tuple[str, ...], target: Target = TARGET) -> str:
    """Every core in turn: reset its L2 arena, run the kernel on its share of the tiles."""
    return render("cpu", "launch.cc", pipes=pipe_names(PIPES), cores=int(target.cores.value),
                  name=kernel.name, args=", ".join(args)).rstrip("\n")
