"""The ascend target's cost model and tiling search (numbers from :mod:`.target`).

GEMM kernel. Output tiles of ``baseM x baseN`` are dealt round-robin to the cores (tile
``t = (b * mt + i) * nt + j`` runs on core ``t % cores``). A tile walks K in steps of
``baseK``; one step is a *stage*, in which queues of depth 2 let the pipes overlap, so
the stage costs its slowest pipe:

* MTE2: ``DataCopy`` A and B tiles GM -> L1 (ND -> NZ in strips of ``e`` rows, each an NZ
  matrix of its own, ``Nd2NzParams.ndNum``: one call for the whole strips, one for a
  partial last strip; one per strip when the strips' GM stride exceeds the documented
  ``srcNdMatrixStride`` range), ``bytes / l2_rate`` per call: the reads are served by the
  L2, which holds the operands when they fit in it;
* HBM: the core's share of the chip's HBM (``dram_bytes_per_cycle / cores``, capped by
  ``ddr_rate``): an element is fetched once into L2 and read by ``reuse`` tiles (``nt``
  for A, ``mt`` for B, times the batches that share the operand), so a read is charged
  ``bytes / (reuse x rate)``; with operands larger than L2 every read goes to HBM;
* MTE1: ``LoadData`` L1 -> L0A (zZ) and L0B (zN), the operand's fp16 fractals' bytes
  ``/ l1_to_l0_{a,b}_rate``, one call each (the strips lie in L1 in L0's fractal order);
* M: ``Mmad``, ``ceil(m/e) ceil(n/e) ceil(k/e)`` cycles (``e = cube_edge``): padding to
  the cube's edge is the waste.

The epilogue of a tile overlaps the core's next tile, since L0C holds two C tiles: in its
first k-step, ``Fixpipe`` writes C from L0C into GM (FIX, whole fp32 fractals read at
``fixpipe_rate``; HBM). With a bias the kernel is a MIX kernel (Atlas A2: cube and vector
are separate cores): after ``CrossCoreSetFlag``/``CrossCoreWaitFlag``, the vector core
reads the tile and the bias (AIV-MTE2 at ``l2_rate``; HBM), adds them (V, one repeat of
``vector_bytes_per_repeat`` per row and 64-float chunk) and writes the tile back (MTE3 at
``ub_to_ddr_rate``; HBM), charged in the same stage (an assumption: the vector core's
chain is taken to overlap the cube's next k-step, though it waits for the Fixpipe). The
core's last tile's epilogue is a stage of its own. A core costs the sum of its stages,
the kernel its slowest core; :func:`cost` predicts exactly what ``include/ascend_sim.h``
counts.

Tiles are multiples of the cube edge that fit double-buffered: ``2 baseM baseK 2 B <=
L0A``, ``2 baseK baseN 2 B <= L0B``, ``2 baseM baseN 4 B <= L0C`` (C of the next tile
accumulates while the previous one drains), the A1/B1 queues twice in L1; with a bias,
the vector core's C, result and bias buffers in UB.

im2col kernel. The cube can do img2col in hardware (``Load3D`` from L1 into L0A, fused into
the convolution), which avoids writing the cols matrix to GM and reading it back; it is
not emitted. Our lowering has a separate im2col kernel, a vector (AIV-only) kernel: per
(image, channel) stage, ``DataCopyPad`` the plane GM -> UB (AIV-MTE2, HBM), then per tap
``Gather`` its row with byte offsets computed once per core (taps in the padding read a
zeroed slot; the scalar pipe is not modelled) and ``DataCopyPad`` it UB -> GM (MTE3,
HBM).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from hw_targets.ascend.target import PIPES, TARGET, cube_edge, defines, fractal_bytes
from hw_targets.base import (
    OUT_BYTES,
    KernelCost,
    Target,
    Tiling,
    UnsupportedKernel,
    best_tiling,
    by_kind,
    ceil_div,
    launched,
    round_up,
)
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = ["MAX_ND_MATRIX_STRIDE", "Model", "aiv_row",
           "check_im2col", "cost", "im2col_buffers", "im2col_shape",
           "tiling"]

#: Tile edges tried for baseM/baseN and for baseK, in multiples of the cube edge: a
#: search space (not hardware), bounded in practice by what fits L0A/L0B/L0C.
MAX_ND_MATRIX_STRIDE = 65535
"""The largest ``Nd2NzParams.srcNdMatrixStride`` (elements), [0, 65535] in asc-devkit's API
page of ``DataCopy`` GM -> L1 with ND2NZ (``docs/zh/api/SIMD-API/基础API/``, matrix
compute, data movement in)."""

_MN_MULTIPLES = (1, 2, 3, 4, 6, 8, 12, 16)
_K_MULTIPLES = (1, 2, 4, 8, 16, 32, 64)

Pipes = dict[str, int]


def _add(*parts: Mapping[str, int]) -> Pipes:
    total = dict.fromkeys(PIPES, 0)
    for part in parts:
        for name, value in part.items():
            total[name] += value
    return total


def _reuse(spec: GemmSpec, mt: int, nt: int, target: Target) -> tuple[int, int, int]:
    """Tiles that read each element of A, B and bias from L2 (1 when L2 cannot hold them)."""
    if spec.compulsory_bytes(target.in_bytes) > int(target.param("l2_bytes")):
        return 1, 1, 1
    shared = {name: max(1, spec.batch // op.period)
              for name, op in (("a", spec.a), ("b", spec.b), ("bias", spec.bias_operand))}
    bias_tiles = mt if spec.bias == "col" else nt
    return nt * shared["a"], mt * shared["b"], bias_tiles * shared["bias"]


def aiv_row(tn: int, target: Target) -> int:
    """fp32 elements of a row of C in UB: whole UB blocks."""
    return round_up(tn, target.buffer("UB").alignment // OUT_BYTES)


def _buffers(spec: GemmSpec, tm: int, tn: int, tk: int, target: Target) -> dict[str, int]:
    """Bytes each memory gives the kernel's queues (A1/B1/A2/B2/CO1 have depth 2; the vector
    core's C, result and bias buffers, with a bias, depth 1)."""
    e = target.in_bytes
    bias = {"none": 0, "row": tm, "col": tn}[spec.bias] * OUT_BYTES
    ub = 0 if spec.bias == "none" else (2 * OUT_BYTES * tm * aiv_row(tn, target)
                                         + round_up(bias, target.buffer("UB").alignment))
    return {
        "L1": 2 * e * (tm * tk + tk * tn),
        "L0A": 2 * e * tm * tk,
        "L0B": 2 * e * tk * tn,
        "L0C": 2 * OUT_BYTES * tm * tn,
        "UB": ub,
    }


class Model:
    """Per-stage pipe charges of one GEMM tiling, as the header's intrinsics charge them."""

    def __init__(self, spec: GemmSpec, tm: int, tn: int, tk: int, target: Target) -> None:
        self.spec, self.tm, self.tn, self.tk = spec, tm, tn, tk
        self.d = defines(target)
        self.edge = cube_edge(target)
        self.in_bytes = target.in_bytes
        self.in_fractal = fractal_bytes(target, target.in_bytes)
        self.out_fractal = fractal_bytes(target, OUT_BYTES)
        self.mt, self.nt, self.kt = ceil_div(spec.m, tm), ceil_div(spec.n, tn), ceil_div(spec.k, tk)
        self.reuse_a, self.reuse_b, self.reuse_bias = _reuse(spec, self.mt, self.nt, target)

    def fractals(self, extent: int) -> int:
        return ceil_div(extent, self.edge)

    def _read(self, nbytes: int, reuse: int) -> Pipes:
        d = self.d
        return {"MTE2": d["dma_issue_cycles"] + ceil_div(nbytes, d["l2_rate"]),
                "HBM": ceil_div(nbytes, reuse * d["hbm_core_rate"])}

    def _strips(self, rows: int, cols: int, pitch: int, reuse: int) -> Pipes:
        """The DataCopy calls of ``CopyStrips``: the whole strips of ``edge`` rows in one call
        (one each when their GM stride exceeds ``MAX_ND_MATRIX_STRIDE``), a partial last
        strip in a call of its own."""
        e, full, rest = self.in_bytes, rows // self.edge, rows % self.edge
        calls = [self.edge] * full if self.edge * pitch > MAX_ND_MATRIX_STRIDE else (
            [full * self.edge] if full else [])
        calls += [rest] if rest else []
        return _add(*(self._read(e * r * cols, reuse) for r in calls))

    def stage(self, rows: int, cols: int, kk: int) -> Pipes:
        """One k-step: DataCopy A and B to L1, one LoadData each to L0A/L0B, Mmad."""
        d = self.d
        mf, nf, kf = self.fractals(rows), self.fractals(cols), self.fractals(kk)
        mte1 = (ceil_div(self.in_fractal * mf * kf, d["l1_to_l0a_rate"])
                + ceil_div(self.in_fractal * kf * nf, d["l1_to_l0b_rate"])
                + 2 * d["dma_issue_cycles"])
        return _add(self._strips(rows, kk, self.spec.k, self.reuse_a),
                    self._strips(kk, cols, self.spec.n, self.reuse_b),
                    {"MTE1": mte1, "M": mf * nf * kf})

    def epilogue(self, rows: int, cols: int) -> Pipes:
        """A tile's way out: Fixpipe L0C -> GM; with a bias, the vector core's round trip."""
        d = self.d
        mf, nf = self.fractals(rows), self.fractals(cols)
        c_bytes = OUT_BYTES * rows * cols
        parts: list[Mapping[str, int]] = [
            {"FIX": d["dma_issue_cycles"] + ceil_div(self.out_fractal * mf * nf,
                                                     d["l0c_out_rate"]),
             "HBM": ceil_div(c_bytes, d["hbm_core_rate"])}]
        if self.spec.bias != "none":
            length = cols if self.spec.bias == "col" else rows
            chunks = ceil_div(cols, d["vector_bytes"] // OUT_BYTES)
            parts += [
                _rename(self._read(c_bytes, 1), "AIV-MTE2"),
                _rename(self._read(OUT_BYTES * length, self.reuse_bias), "AIV-MTE2"),
                {"V": d["flag_cycles"] + rows * chunks * d["vector_repeat_cycles"]},
                {"MTE3": d["dma_issue_cycles"] + ceil_div(c_bytes, d["ub_to_ddr_rate"]),
                 "HBM": ceil_div(c_bytes, d["hbm_core_rate"])},
            ]
        return _add(*parts)


def _rename(pipes: Mapping[str, int], mte2: str) -> Pipes:
    """The same charges with MTE2 read as another core's MTE2."""
    return {(mte2 if name == "MTE2" else name): value for name, value in pipes.items()}


def _pipes_max(p: Mapping[str, int]) -> int:
    return max(p.values())


def _gemm_cost(spec: GemmSpec, tiling: Tiling, target: Target) -> KernelCost:
    tm, tn, tk, cores = tiling.tile_m, tiling.tile_n, tiling.tile_k, tiling.cores
    model = Model(spec, tm, tn, tk, target)
    mt, nt, kt = model.mt, model.nt, model.kt
    edge_m, edge_n, edge_k = spec.m - (mt - 1) * tm, spec.n - (nt - 1) * tn, spec.k - (kt - 1) * tk
    # Tile kinds: 2 * (last row block) + (last column block).
    shapes = [(tm, tn), (tm, edge_n), (edge_m, tn), (edge_m, edge_n)]
    full = [model.stage(r, c, tk) for r, c in shapes]
    last = [model.stage(r, c, edge_k) for r, c in shapes]
    total = [_add(*([full[k]] * (kt - 1) + [last[k]])) for k in range(4)]
    epi = [model.epilogue(r, c) for r, c in shapes]

    def tile(k: int, p: int | None) -> int:
        """Cycles of a tile of kind k; the epilogue of the core's previous tile (kind p)
        runs in its first k-step."""
        explicit = {0, kt - 1}
        cycles = (kt - len(explicit)) * _pipes_max(full[k])
        for s in explicit:
            parts: list[Mapping[str, int]] = [last[k] if s == kt - 1 else full[k]]
            if p is not None and s == 0:
                parts.append(epi[p])
            cycles += _pipes_max(_add(*parts))
        return cycles

    tiles = spec.batch * mt * nt
    t = np.arange(tiles)
    kind = 2 * (((t // nt) % mt) == mt - 1) + ((t % nt) == nt - 1)
    core = t % cores
    present = set(kind.tolist())
    after = np.zeros((4, 4), dtype=np.int64)
    for k, p in itertools.product(present, present):
        after[k, p] = tile(k, p)
    alone = np.array([tile(k, None) if k in present else 0 for k in range(4)])
    prev = kind[np.maximum(t - cores, 0)]
    per_tile = np.where(t >= cores, after[kind, prev], alone[kind])
    per_core = np.bincount(core, weights=per_tile, minlength=cores).astype(np.int64)
    busy = np.arange(cores) < tiles
    final_tile = np.arange(cores) + cores * ((tiles - 1 - np.arange(cores)) // cores)
    final = np.array([_pipes_max(e) for e in epi])
    per_core[busy] += final[kind[final_tile[busy]]]
    slowest = int(np.argmax(per_core))
    counts = np.bincount(kind[core == slowest], minlength=4)
    pipes = _add(*[{n: int(c) * (total[k][n] + epi[k][n]) for n in PIPES}
                   for k, c in enumerate(counts)])
    stages = int(counts.sum()) * kt + (1 if counts.sum() else 0)
    edge = model.edge
    padded = spec.batch * round_up(spec.m, edge) * round_up(spec.n, edge) * round_up(spec.k, edge)
    sizes = spec.sizes()
    e = target.in_bytes
    bias_reads = {"none": 0, "row": spec.batch * spec.m * nt, "col": spec.batch * spec.n * mt}
    hbm = (e * spec.batch * spec.m * spec.k * nt // model.reuse_a
           + e * spec.batch * spec.k * spec.n * mt // model.reuse_b
           + OUT_BYTES * bias_reads[spec.bias] // model.reuse_bias + OUT_BYTES * sizes["c"])
    return KernelCost(int(per_core[slowest]), pipes, stages, spec.macs, padded, hbm)


def _candidates(extent: int, edge: int, multiples: tuple[int, ...]) -> list[int]:
    sizes = tuple(edge * m for m in multiples)
    full = round_up(extent, edge)
    return sorted({s for s in sizes if s < full} | ({full} if full <= max(sizes) else set()))


def _fits(buffers: Mapping[str, int], target: Target) -> bool:
    return all(used <= target.buffer(name).bytes for name, used in buffers.items())


def tiling(spec: GemmSpec, target: Target = TARGET) -> Tiling:
    """The tiling of least predicted cycles among those that fit double-buffered."""
    cores, edge = int(target.cores.value), cube_edge(target)
    ms = _candidates(spec.m, edge, _MN_MULTIPLES)
    ns = _candidates(spec.n, edge, _MN_MULTIPLES)
    ks = _candidates(spec.k, edge, _K_MULTIPLES)
    fitting = (Tiling(tm, tn, tk, cores, buffers=buffers)
               for tm, tn, tk in itertools.product(ms, ns, ks)
               if _fits(buffers := _buffers(spec, tm, tn, tk, target), target))
    return best_tiling(fitting, lambda c: _gemm_cost(spec, c, target),
                       f"no tiling of {spec.name} fits the L0/L1/UB buffers of {target.name}")


# ---------------------------------------------------------------------------- im2col model

def im2col_shape(spec: Im2colSpec, target: Target) -> tuple[int, int, int]:
    """Elements of a plane, of its UB buffer (plane padded to the cube edge, then a zero
    slot of one edge), of cols."""
    ho, wo = spec.out_hw
    plane, edge = spec.height * spec.width, cube_edge(target)
    return plane, round_up(plane, edge) + edge, spec.kernel[0] * spec.kernel[1] * ho * wo


def im2col_buffers(spec: Im2colSpec, target: Target) -> tuple[int, int, int]:
    """UB bytes of one x buffer, one cols buffer (one tap's row) and the offsets (every
    tap's; each UB-aligned)."""
    _, buffer, cols = im2col_shape(spec, target)
    align, e = target.buffer("UB").alignment, target.in_bytes
    offset_bytes = 4  # uint32 byte offsets of Gather
    ho, wo = spec.out_hw
    return (round_up(e * buffer, align), round_up(e * ho * wo, align),
            round_up(offset_bytes * cols, align))


def check_im2col(spec: Im2colSpec, target: Target) -> None:
    x, cols, offsets = im2col_buffers(spec, target)
    need, have = 2 * x + 2 * cols + offsets, target.buffer("UB").bytes
    if need > have:
        raise UnsupportedKernel(
            f"{spec.name}: one channel's plane and cols rows need {need} bytes of UB, more "
            f"than its {have}; a fused Load3D convolution would tile them through L1")


def _im2col_cost(spec: Im2colSpec, target: Target) -> KernelCost:
    check_im2col(spec, target)
    d, e = defines(target), target.in_bytes
    plane, _, _ = im2col_shape(spec, target)
    taps, row = spec.kernel[0] * spec.kernel[1], e * spec.out_hw[0] * spec.out_hw[1]
    vector = (ceil_div(e * cube_edge(target), d["vector_bytes"])
              + taps * ceil_div(row, d["vector_bytes"]))
    stage = _add(
        {"AIV-MTE2": d["dma_issue_cycles"] + ceil_div(e * plane, d["l2_rate"]),
         "HBM": ceil_div(e * plane, d["hbm_core_rate"])},
        {"V": vector * d["vector_repeat_cycles"]},
        {"MTE3": taps * (d["dma_issue_cycles"] + ceil_div(row, d["ub_to_ddr_rate"])),
         "HBM": taps * ceil_div(row, d["hbm_core_rate"])},
    )
    busiest = ceil_div(spec.images * spec.channels, int(target.cores.value))
    return KernelCost(busiest * max(stage.values()), {n: busiest * v for n, v in stage.items()},
                      busiest, 0, 0, spec.compulsory_bytes(e))


def cost(spec: KernelSpec, tiling: Tiling | None, target: Target = TARGET) -> KernelCost:
    """Cycles of the kernel, stage by stage, as ``include/ascend_sim.h`` counts them."""
    return launched(by_kind(spec, tiling, lambda g, t: _gemm_cost(g, t, target),
                            lambda i: _im2col_cost(i, target)), target, PIPES[0])
