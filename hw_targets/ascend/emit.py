"""The ascend target's emitter: Ascend C kernels filled in from ``templates/ascend/``.

The kernels' text is in the template files; this module computes what goes in the
placeholders, every number from the kernel's shape, its tiling, the cost model's
:class:`~hw_targets.ascend.cost.Model` (tile counts and L2 reuse, so the kernel charges
what the model predicts) or the target's description (cube edge, fractal size, the UB's
32-byte block). The bias epilogue is a table from the bias kind to its template.
"""

from __future__ import annotations

from hw_targets.ascend.cost import (
    MAX_ND_MATRIX_STRIDE,
    Model,
    aiv_row,
    check_im2col,
    im2col_buffers,
    im2col_shape,
)
from hw_targets.ascend.target import PIPES, TARGET, cube_edge
from hw_targets.base import (
    OUT_BYTES,
    KernelSource,
    Target,
    Tiling,
    UnsupportedKernel,
    by_kind,
    pipe_names,
    round_up,
)
from hw_targets.render import render
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["emit", "launch"]

_MAX_REPEATS = 255  # Ascend C's repeatTimes is a uint8_t: longer vector ops are split
_BIAS_TEMPLATE = {"col": "bias_col.cc", "row": "bias_row.cc"}
#: bias kind -> (its length in a tile, its offset in the batch's bias)
_BIAS_SLICE = {"col": ("cols", "j * BASE_N"), "row": ("rows", "i * BASE_M")}
_AIV_NOTE = ("\n   Vector (AIV, a MIX kernel): once CrossCoreWaitFlag sees the Fixpipe done, C "
             "and the bias go GM -> UB\n   (DataCopyPad), the vector unit adds them, "
             "DataCopyPad UB -> GM.")


def _fractal_values(target: Target) -> dict[str, int]:
    """Placeholders of the fractal layout: its edge, its elements, and the UB blocks of one
    fp32 fractal row (a ``DataCopyPad``/vector stride counts 32-byte blocks)."""
    edge, block = cube_edge(target), target.buffer("UB").alignment
    return {"edge": edge, "edge_less": edge - 1, "fractal": edge * edge, "block": block,
            "block_floats": block // OUT_BYTES, "block_floats_less": block // OUT_BYTES - 1,
            "vector_floats": int(target.param("vector_bytes_per_repeat")) // OUT_BYTES}


def emit(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelSource:
    """The kernel's Ascend C source (the entry symbol is ``<name>_custom``)."""
    return by_kind(spec, tiling, lambda g, t: _emit_gemm(g, t, target),
                   lambda i: _emit_im2col(i, target))


def _snippet(name: str, **values: object) -> str:
    """An optional part of a kernel, inserted right after the line it extends."""
    return render("ascend", name, **values).rstrip("\n")


def _emit_gemm(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelSource:
    tm, tn, tk, cores = tiling.tile_m, tiling.tile_n, tiling.tile_k, tiling.cores
    edge = cube_edge(target)
    if tm % edge or tn % edge or tk % edge:
        raise UnsupportedKernel(f"{spec.name}: tiles {tm}x{tn}x{tk} are not multiples of {edge}")
    model = Model(spec, tm, tn, tk, target)
    sizes = spec.sizes()
    fractal = _fractal_values(target)
    parts = dict.fromkeys(("aiv_init", "aiv_call", "aiv_tail", "fix_signal", "aiv_decl",
                           "aiv_methods", "aiv_note"), "")
    kernel_type = "KERNEL_TYPE_AIC_ONLY"
    if spec.bias != "none":
        kernel_type = "KERNEL_TYPE_MIX_AIC_1_1"
        length, offset = _BIAS_SLICE[spec.bias]
        bias_len = tn if spec.bias == "col" else tm
        bias_add = render("ascend", _BIAS_TEMPLATE[spec.bias], max_repeats=_MAX_REPEATS,
                          **fractal)
        parts = {name: _snippet(f"{name}.cc", size_bias=sizes["bias"],
                                row_floats=aiv_row(tn, target),
                                bias_bytes=round_up(OUT_BYTES * bias_len,
                                                    target.buffer("UB").alignment),
                                bias_len=length, bias_offset=offset, bias_add=bias_add,
                                **fractal)
                 for name in parts if name != "aiv_note"}
        parts["aiv_note"] = _AIV_NOTE
    code = render(
        "ascend", "gemm.cc",
        name=spec.name, plus_bias=" + bias" if spec.bias != "none" else "",
        batch=spec.batch, m=spec.m, k=spec.k, n=spec.n, tm=tm, tn=tn, tk=tk, cores=cores,
        mt=model.mt, nt=model.nt, kt=model.kt,
        pa=spec.a.period, sa=spec.a.stride, pb=spec.b.period, sb=spec.b.stride,
        pc=spec.c.period, sc=spec.c.stride,
        pbias=spec.bias_operand.period, sbias=spec.bias_operand.stride,
        reuse_a=model.reuse_a, reuse_b=model.reuse_b, reuse_bias=model.reuse_bias,
        size_a=sizes["a"], size_b=sizes["b"], size_c=sizes["c"], kernel_type=kernel_type,
        max_nd_stride=MAX_ND_MATRIX_STRIDE, **parts, **fractal,
    )
    return KernelSource(spec.name, code, ("a", "b", "bias", "c"))


def _emit_im2col(spec: Im2colSpec, target: Target) -> KernelSource:
    check_im2col(spec, target)
    ho, wo = spec.out_hw
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    plane, buffer, _ = im2col_shape(spec, target)
    x_bytes, cols_bytes, offset_bytes = im2col_buffers(spec, target)
    edge = cube_edge(target)
    code = render(
        "ascend", "im2col.cc",
        name=spec.name, images=spec.images, channels=spec.channels, height=spec.height,
        width=spec.width, kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw, top=spec.pads[0],
        left=spec.pads[1], groups=spec.groups, k=spec.k, hw=ho * wo, ho=ho, wo=wo,
        taps=kh * kw, plane=plane, zero=buffer - edge, edge=edge, x_bytes=x_bytes,
        cols_bytes=cols_bytes, offset_bytes=offset_bytes,
    )
    return KernelSource(spec.name, code, ("x", "cols"))


def launch(kernel: KernelSource, args: tuple[str, ...], target: Target = TARGET) -> str:
    """Every core in turn: reset its memories (``qm_begin_core``), run the kernel. A GEMM's
    arguments get the L2 reuse its cost model assumes (what the kernel's REUSE_* say)."""
    pointers = ", ".join(f"(GM_ADDR)({a})" for a in args)
    reuse = ""
    if kernel.args == ("a", "b", "bias", "c"):
        reuse = "".join(f"\nAscendC::qm_l2_reuse({arg}, {kernel.name}::REUSE_{name});"
                        for arg, name in zip(args, ("A", "B", "BIAS"), strict=False))
    return render("ascend", "launch.cc", pipes=pipe_names(PIPES), cores=int(target.cores.value),
                  name=kernel.name, pointers=pointers, reuse=reuse).rstrip("\n")
