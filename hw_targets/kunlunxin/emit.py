"""The kunlunxin target's emitter: XPU C/C++ kernels filled in from ``templates/kunlunxin/``.

Vector widths come from the description's ``simd_bits``, the padded N and the LM layout
from the cost model (so the kernel allocates what the model charges), the launch grid
from ``clusters`` x ``cores_per_cluster``. The bias epilogue is a table from the bias
kind to what fills in its template.
"""

from __future__ import annotations

from hw_targets.base import KernelSource, Target, Tiling, by_kind, pipe_names, round_up
from hw_targets.kunlunxin.cost import active, im2col_chunk, im2col_lm_bytes, lm_bytes
from hw_targets.kunlunxin.target import PIPES, TARGET, defines, lanes
from hw_targets.render import render
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["emit", "launch"]

#: bias kind -> (LM length, GM offset of the tile's slice, its extent, the vector add)
_BIAS = {
    "row": ("TM", "i * TM", "rows", "svadd_float32x16(lm_bias[r], acc)"),
    "col": ("TN32", "j * TN", "cols",
            "vvadd_float32x16(acc, vload_lm_float32x16(lm_bias + v + h))"),
}


def emit(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelSource:
    """The kernel's XPU C/C++ source (the entry point is ``<name>::kernel``)."""
    return by_kind(spec, tiling, lambda g, t: _emit_gemm(g, t, target),
                   lambda i: _emit_im2col(i, target))


def _emit_gemm(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelSource:
    f_lanes, h_lanes = lanes(target)
    tm, tn, tk = tiling.tile_m, tiling.tile_n, tiling.tile_k
    bias_alloc = bias_load = bias_add = ""
    if spec.bias != "none":
        length, offset, extent, operand = _BIAS[spec.bias]
        bias_alloc = render("kunlunxin", "bias_alloc.cc", length=length)
        bias_load = render("kunlunxin", "bias_load.cc", period=spec.bias_operand.period,
                           stride=spec.bias_operand.stride, offset=offset, extent=extent)
        bias_add = render("kunlunxin", "bias_add.cc", operand=operand)
    code = render(
        "kunlunxin", "gemm.cc",
        name=spec.name, plus_bias=" + bias" if spec.bias != "none" else "", batch=spec.batch,
        m=spec.m, k=spec.k, n=spec.n, tm=tm, tn=tn, tk=tk, tnp=round_up(tn, h_lanes),
        h_lanes=h_lanes, f_lanes=f_lanes,
        sharers=int(target.param("simd_sharers")),
        active=active(spec, tm, tn, int(target.cores.value)),
        pa=spec.a.period, sa=spec.a.stride, pb=spec.b.period, sb=spec.b.stride,
        pc=spec.c.period, sc=spec.c.stride, bias_alloc=bias_alloc, bias_load=bias_load,
        bias_add=bias_add, lm_used=lm_bytes(spec, tm, tn, tk, target),
    )
    return KernelSource(spec.name, code, ("a", "b", "bias", "c"))


def _emit_im2col(spec: Im2colSpec, target: Target) -> KernelSource:
    ho, wo = spec.out_hw
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    row, chunk = im2col_chunk(spec, target)
    code = render(
        "kunlunxin", "im2col.cc",
        name=spec.name, images=spec.images, channels=spec.channels, height=spec.height,
        width=spec.width, kh=kh, kw=kw, groups=spec.groups, k=spec.k, hw=ho * wo,
        chunk=chunk, ho=ho, wo=wo, sh=sh, sw=sw, top=spec.pads[0], left=spec.pads[1],
        dh=dh, dw=dw, row=row, lm_used=im2col_lm_bytes(spec, target),
        active=min(int(target.cores.value), spec.images * spec.groups * spec.k),
    )
    return KernelSource(spec.name, code, ("x", "cols"))


def launch(kernel: KernelSource, args: tuple[str, ...], target: Target = TARGET) -> str:
    """``kernel<<<clusters, cores_per_cluster>>>`` as a loop over the simulated cores."""
    d = defines(target)
    return render("kunlunxin", "launch.cc", pipes=pipe_names(PIPES), name=kernel.name,
                  clusters=d["clusters"], per_cluster=d["cores_per_cluster"],
                  args=", ".join(args)).rstrip("\n")
