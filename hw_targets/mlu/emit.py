"""The mlu target's emitter: BANG C kernels filled in from ``templates/mlu/``.

The NRAM layout, the A slot and the padded K/N units come from the cost model's
:class:`~hw_targets.mlu.cost.Rates` (read from the description), so the emitted kernel
allocates and pads exactly what the model charges. Optional parts are tables from the
bias kind (or the im2col stride) to their template.
"""

from __future__ import annotations

from hw_targets.base import KernelSource, Target, Tiling, by_kind, pipe_names, round_up
from hw_targets.mlu.cost import (
    PIPELINE_DEPTH,
    Rates,
    bias_len,
    first_padded,
    im2col_tasks,
    nram_layout,
    resident,
    row_len,
    slot,
    wram_bytes,
)
from hw_targets.mlu.target import PIPES, TARGET
from hw_targets.render import render
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["emit", "launch"]

_RESIDENCY = {
    True: "WRAM holds two B panels (every k-chunk of a column): a core loads its column's\n"
          "   panel with the column's first tile and keeps it for the others.",
    False: "WRAM holds two B chunks: every step loads its own.",
}
_BIAS_NOTE = {"none": "", "row": " + bias[row]", "col": " + bias[col]"}
#: bias kind -> (template loading the bias with a tile's first chunk, template adding it
#: after its last one)
_BIAS_TEMPLATES = {"row": ("load_bias_row.cc", "add_bias_row.cc"),
                   "col": ("load_bias_col.cc", "add_bias_col.cc")}


def emit(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelSource:
    """The kernel's BANG C source (the entry point is ``<name>::kernel``)."""
    return by_kind(spec, tiling, lambda g, t: _emit_gemm(g, t, target),
                   lambda i: _emit_im2col(i, target))


def _emit_gemm(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelSource:
    r = Rates.of(target, tiling.cores)
    tm, tn, tk = tiling.tile_m, tiling.tile_n, min(tiling.tile_k, spec.k)
    layout = nram_layout(spec, tm, tn, tk, r)
    load_bias = add_bias = zero_first = zero_note = ""
    if first_padded(spec, tk, r):
        zero_first = render("mlu", "zero_first.cc", line=r.line, line_less=r.line - 1)
        zero_note = " A first iteration zeroes step 0's padding."
    if spec.bias != "none":
        load_name, add_name = _BIAS_TEMPLATES[spec.bias]
        load_bias, add_bias = render("mlu", load_name), render("mlu", add_name)
    code = render(
        "mlu", "gemm.cc",
        name=spec.name, bias_note=_BIAS_NOTE[spec.bias], batch=spec.batch, m=spec.m,
        k=spec.k, n=spec.n, tm=tm, tn=tn, tk=tk, cores=tiling.cores,
        nram_used=layout["used"], wram_used=wram_bytes(spec, tn, tk, r),
        resident="true" if resident(spec, tn, tk, r) else "false",
        residency=_RESIDENCY[resident(spec, tn, tk, r)],
        k_align=r.k_align, k_align_less=r.k_align - 1,
        n_align=r.n_align, n_align_less=r.n_align - 1, line=r.line, line_less=r.line - 1,
        a_slot=slot(tm, round_up(tk, r.k_align), r),
        bias_slot=bias_len(spec, tm, round_up(tn, r.n_align), r),
        pa=spec.a.period, sa=spec.a.stride, pb=spec.b.period, sb=spec.b.stride,
        pc=spec.c.period, sc=spec.c.stride,
        pbias=spec.bias_operand.period, sbias=spec.bias_operand.stride,
        load_bias=load_bias, add_bias=add_bias, depth=PIPELINE_DEPTH,
        zero_first=zero_first, zero_note=zero_note,
        **{f"off_{region}": offset for region, offset in layout.items()},
    )
    return KernelSource(spec.name, code, ("a", "b", "bias", "c"))


def _emit_im2col(spec: Im2colSpec, target: Target) -> KernelSource:
    tasks = im2col_tasks(spec, target)
    r = Rates.of(target, tasks)
    ho, wo = spec.out_hw
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    # stride 1: an output row's valid pixels are one segment; else one 2-byte segment each
    gather = render("mlu", "gather_contiguous.cc" if sw == 1 else "gather_strided.cc")
    code = render(
        "mlu", "im2col.cc",
        name=spec.name, images=spec.images, channels=spec.channels, height=spec.height,
        width=spec.width, kh=kh, kw=kw, groups=spec.groups, k=spec.k, hw=ho * wo,
        tasks=tasks, ho=ho, wo=wo, row_len=row_len(ho * wo, r), sh=sh, sw=sw, dh=dh, dw=dw,
        top=spec.pads[0], left=spec.pads[1], gather=gather.rstrip("\n"),
    )
    return KernelSource(spec.name, code, ("x", "cols"))


def launch(kernel: KernelSource, args: tuple[str, ...], target: Target = TARGET) -> str:
    """Bind the kernel's NRAM (and WRAM) arrays, then run every task in turn."""
    ns = kernel.name
    wram = (f"{ns}::wram_buffer, sizeof({ns}::wram_buffer)" if "b" in kernel.args
            else "nullptr, 0")
    return render("mlu", "launch.cc", pipes=pipe_names(PIPES), name=ns, wram=wram,
                  args=", ".join(args)).rstrip("\n")
