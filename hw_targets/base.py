"""What a target is, as data, and the contract every target module fulfils.

A target is a *style* of NPU simulated on the CPU (docs/TARGETS.md): a declared description
(memory levels and sizes, compute unit, alignment, bandwidths, clock, cores), a
first-order cost model, an emitter that writes kernels in the backend's dialect, and a
C++ header that gives each intrinsic those kernels use its meaning on the CPU.

Every number of a description is a :class:`Param` that says where it comes from:
``V`` read in vendor code or an official document, ``S`` a secondary source, ``U`` an
assumption (derived or unverified). Assumptions are named and overridable
(``dataclasses.replace`` on the target), never hidden constants.

Cycle accounting is shared by the cost model and the simulation: a kernel is a sequence
of *stages* (one double-buffered iteration); in a stage every pipe (DMA in, compute,
DMA out, ...) is charged integer cycles, and the stage costs the maximum over its pipes,
because double-buffered pipes overlap. A core's cycles are the sum of its stages; a
kernel's cycles are those of its slowest core. The cost model predicts exactly what the
simulation counts for the operations it executes (tests check equality).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, TypeVar

import numpy as np

from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec

__all__ = [
    "OUT_BYTES",
    "Buffer",
    "KernelCost",
    "KernelSource",
    "Param",
    "Target",
    "TargetModule",
    "TileCost",
    "Tiling",
    "UnsupportedKernel",
    "best_tiling",
    "by_kind",
    "ceil_div",
    "grid_cost",
    "launch_cycles",
    "launched",
    "pipe_names",
    "roofline",
    "round_up",
]

Tag = Literal["V", "S", "U"]
T = TypeVar("T")

OUT_BYTES = 4
"""Bytes of an element of C and of the bias: fp32 on every target (see :mod:`hw_targets.spec`)."""


@dataclass(frozen=True)
class Param:
    """One declared number, with its unit, its source tag and where it comes from."""

    value: float
    unit: str
    tag: Tag
    source: str

    def __int__(self) -> int:
        return int(self.value)

    def __float__(self) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Buffer:
    """An on-chip memory level of one core (or one cluster when ``scope == "cluster"``).

    ``align`` is the byte alignment of every allocation in it (a :class:`Param`, so the
    alignment a kernel and the simulation's arena use is declared with its source like
    the size, and overriding it reaches both).
    """

    name: str
    size: Param
    align: Param
    scope: Literal["core", "cluster"] = "core"

    @property
    def bytes(self) -> int:
        return int(self.size.value)

    @property
    def alignment(self) -> int:
        return int(self.align.value)


@dataclass(frozen=True)
class Target:
    """A target described as data; see the module docstring for the tags.

    ``params`` holds every further number the cost model and the emitter use (rates per
    path, latencies, alignment in elements), by name, so that a table of a target is
    ``target.table()`` and nothing else decides cycles.
    """

    name: str
    dialect: str
    summary: str
    clock_hz: Param
    cores: Param
    buffers: tuple[Buffer, ...]
    dram_bytes_per_cycle: Param
    macs_per_cycle: Param
    in_dtype: Literal["half", "float"]
    params: Mapping[str, Param] = field(default_factory=dict)

    def buffer(self, name: str) -> Buffer:
        for buffer in self.buffers:
            if buffer.name == name:
                return buffer
        raise KeyError(f"{self.name} has no buffer {name!r}")

    def param(self, name: str) -> float:
        return float(self.params[name].value)

    @property
    def in_bytes(self) -> int:
        """Bytes of one input element in global memory (fp16 on the NPUs, fp32 on cpu)."""
        return 2 if self.in_dtype == "half" else 4

    def table(self) -> list[dict[str, object]]:
        """Every declared number as rows (name, value, unit, tag, source), for docs."""
        rows: list[tuple[str, Param]] = [
            ("clock", self.clock_hz),
            ("cores", self.cores),
            ("dram bytes/cycle (chip)", self.dram_bytes_per_cycle),
            ("MACs/cycle (core)", self.macs_per_cycle),
        ]
        rows += [(f"{b.name} bytes ({b.scope})", b.size) for b in self.buffers]
        rows += [(f"{b.name} align ({b.scope})", b.align) for b in self.buffers]
        rows += list(self.params.items())
        return [
            {"name": n, "value": p.value, "unit": p.unit, "tag": p.tag, "source": p.source}
            for n, p in rows
        ]


@dataclass(frozen=True)
class Tiling:
    """Tile sizes of a GEMM kernel (in elements) and how many cores run it.

    ``extra`` carries target-specific choices (e.g. a K-split or a staging level) so the
    emitter and the cost model read one record.
    """

    tile_m: int
    tile_n: int
    tile_k: int
    cores: int
    buffers: Mapping[str, int] = field(default_factory=dict)
    extra: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "tile_m": self.tile_m,
            "tile_n": self.tile_n,
            "tile_k": self.tile_k,
            "cores": self.cores,
            "buffer_bytes": dict(self.buffers),
            **dict(self.extra),
        }


@dataclass(frozen=True)
class KernelCost:
    """Predicted cycles of one kernel (not :class:`qmpass.plan.plan.Cost`, a plan's
    parameter and FLOP count).

    ``pipes``: total cycles charged to each pipe on the slowest core; ``cycles``: that
    core's sum over stages of the maximum over pipes; ``stages``: stages it ran;
    ``dram_bytes``: the bytes all cores move between global memory and the chip, as the
    model charges them (re-reads and padding to transfer units included).
    """

    cycles: int
    pipes: Mapping[str, int]
    stages: int
    macs: int
    padded_macs: int
    dram_bytes: int

    @property
    def padding_waste(self) -> float:
        """Share of the compute unit's MACs spent on padding to its native shape."""
        return 1.0 - self.macs / self.padded_macs if self.padded_macs else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "cycles": self.cycles,
            "pipes": dict(self.pipes),
            "stages": self.stages,
            "macs": self.macs,
            "padded_macs": self.padded_macs,
            "padding_waste": round(self.padding_waste, 4),
            "dram_bytes": self.dram_bytes,
        }


@dataclass(frozen=True)
class KernelSource:
    """One emitted kernel: its entry symbol and its source text in the target's dialect.

    ``args`` names the global-memory arguments in order (``a``, ``b``, ``bias``, ``c`` for
    a GEMM; ``x``, ``cols`` for an im2col).
    """

    name: str
    code: str
    args: tuple[str, ...]


class UnsupportedKernel(ValueError):
    """A kernel shape or kind that a target cannot lower, with the reason."""


class TargetModule(Protocol):
    """What ``hw_targets.<name>`` provides (cpu, ascend, mlu, kunlunxin)."""

    TARGET: Target
    HEADER: str  # file name of the simulation header in hw_targets/include/

    def tiling(self, spec: GemmSpec, target: Target) -> Tiling:
        """Tile sizes that fit the target's buffers (double-buffered) and alignment."""
        ...

    def cost(self, spec: KernelSpec, tiling: Tiling | None, target: Target) -> KernelCost:
        """Cycles of the kernel, stage by stage, as the simulation counts them."""
        ...

    def emit(self, spec: KernelSpec, tiling: Tiling | None, target: Target) -> KernelSource:
        """The kernel's source in the target's dialect."""
        ...

    def defines(self, target: Target) -> dict[str, int]:
        """The integer constants the simulation header charges cycles with.

        The harness writes them as ``#define QM_<NAME> <value>`` before the header, so
        the header and the cost model read the same numbers from the same
        :class:`Target`.
        """
        ...

    def launch(self, kernel: KernelSource, args: tuple[str, ...], target: Target) -> str:
        """C++ statements that run ``kernel`` on every core of the simulated device.

        ``args`` are the C++ expressions of the global-memory pointers, in the order of
        ``kernel.args``. The statements must call ``qmsim::core_begin(i)`` and
        ``qmsim::core_end()`` around core ``i`` (the simulation runs cores one after the
        other; only their cycles are combined as if concurrent).
        """
        ...


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def roofline(spec: KernelSpec, target: Target) -> int:
    """Cycles no kernel can beat on the whole chip: compute at peak or compulsory traffic.

    Compute: MACs / (MACs per cycle per core x cores). Traffic: every input read once and
    every output written once, at the chip's DRAM bandwidth.
    """
    cores = int(target.cores.value)
    compute = spec.macs / (float(target.macs_per_cycle) * cores)
    traffic = spec.compulsory_bytes(target.in_bytes) / float(target.dram_bytes_per_cycle)
    return math.ceil(max(compute, traffic))


@dataclass(frozen=True)
class TileCost:
    """Cycles of one output tile: its stages' sum of pipe maxima, per-pipe totals, and the
    bytes it moves between global memory and the chip."""

    cycles: int
    stages: int
    pipes: Mapping[str, int]
    moved: int


def grid_cost(
    spec: GemmSpec,
    tile_m: int,
    tile_n: int,
    cores: int,
    tile_cost: Callable[[int, int], TileCost],
    padded_macs: int,
    core_class: Callable[[int], Callable[[int, int], TileCost]] | None = None,
) -> KernelCost:
    """Cost of a GEMM whose output tiles are dealt round-robin to ``cores``.

    Tiles are numbered batch-major, then by row block, then by column block
    (``t = (b * mt + i) * nt + j``) and core ``t % cores`` runs tile ``t``; an emitter
    must walk them in that order for the simulation to count what this predicts.
    ``tile_cost(rows, cols)`` gives one tile's cycles (edge tiles are smaller); with
    ``core_class``, core ``c`` costs its tiles with ``core_class(c)`` instead (cores that
    share a unit pay more), evaluated once per distinct function.
    """
    mt, nt = ceil_div(spec.m, tile_m), ceil_div(spec.n, tile_n)
    tiles = spec.batch * mt * nt
    index = np.arange(tiles)
    i = (index // nt) % mt
    j = index % nt
    rows = np.where(i == mt - 1, spec.m - (mt - 1) * tile_m, tile_m)
    cols = np.where(j == nt - 1, spec.n - (nt - 1) * tile_n, tile_n)
    kinds = {(int(r), int(c)) for r, c in {(rows[0], cols[0]), (rows[-1], cols[-1]),
                                           (rows[0], cols[-1]), (rows[-1], cols[0])}}
    core = index % cores
    groups: dict[int, tuple[Callable[[int, int], TileCost], np.ndarray]] = {}
    if core_class is not None:
        for c in range(cores):
            f = core_class(c)
            groups.setdefault(id(f), (f, np.zeros(cores, dtype=bool)))[1][c] = True
    if not groups:
        groups[0] = (tile_cost, np.ones(cores, dtype=bool))
    per_core = np.zeros(cores, dtype=np.int64)
    stages = np.zeros(cores, dtype=np.int64)
    costs_of: list[tuple[np.ndarray, dict[tuple[int, int], TileCost]]] = []
    for f, owned in groups.values():
        costs = {kind: f(*kind) for kind in kinds}
        costs_of.append((owned, costs))
        for (r, c), tc in costs.items():
            counts = np.bincount(core[(rows == r) & (cols == c)], minlength=cores) * owned
            per_core += counts * tc.cycles
            stages += counts * tc.stages
    slowest = int(np.argmax(per_core))
    pipes: dict[str, int] = {}
    moved = 0
    for (r, c), tc in costs_of[0][1].items():
        moved += int(np.count_nonzero((rows == r) & (cols == c))) * tc.moved
    for owned, costs in costs_of:
        if not owned[slowest]:
            continue
        for (r, c), tc in costs.items():
            count = int(np.count_nonzero((rows == r) & (cols == c) & (core == slowest)))
            for name, value in tc.pipes.items():
                pipes[name] = pipes.get(name, 0) + count * value
    return KernelCost(
        cycles=int(per_core[slowest]),
        pipes=pipes,
        stages=int(stages[slowest]),
        macs=spec.macs,
        padded_macs=padded_macs,
        dram_bytes=moved,
    )


def launch_cycles(target: Target) -> int:
    """Cycles from a kernel's launch until its cores start (``launch_cycles``; 0 if the
    target declares none). Every core pays them, as a stage of its own, before its work."""
    param = target.params.get("launch_cycles")
    return int(param) if param is not None else 0


def launched(cost: KernelCost, target: Target, pipe: str) -> KernelCost:
    """``cost`` with the launch stage (charged to ``pipe``, the first of the target's pipes,
    as ``qmsim::core_begin`` charges it)."""
    launch = launch_cycles(target)
    if not launch:
        return cost
    pipes = dict(cost.pipes)
    pipes[pipe] = pipes.get(pipe, 0) + launch
    return replace(cost, cycles=cost.cycles + launch, pipes=pipes, stages=cost.stages + 1)


def by_kind(
    spec: KernelSpec,
    tiling: Tiling | None,
    gemm: Callable[[GemmSpec, Tiling], T],
    im2col: Callable[[Im2colSpec], T],
) -> T:
    """The dispatch every target's ``cost`` and ``emit`` share: an im2col needs no
    tiling, a GEMM does, and a GEMM without one is refused the same way on every target
    (:class:`UnsupportedKernel`, not an ``assert`` that ``python -O`` would drop)."""
    if isinstance(spec, Im2colSpec):
        return im2col(spec)
    if tiling is None:
        raise UnsupportedKernel(f"{spec.name}: a GEMM needs a tiling")
    return gemm(spec, tiling)


def best_tiling(
    candidates: Iterable[Tiling],
    cost: Callable[[Tiling], KernelCost],
    refusal: str,
    bound: Callable[[Tiling], float] | None = None,
) -> Tiling:
    """The candidate of least predicted ``(cycles, stages)``; the first one on ties.

    With ``bound`` (a lower bound on a candidate's cycles) candidates are costed in the
    order of their bound and the search stops once the bound exceeds the best cost found,
    which is exact because the bound never exceeds the cost. No candidate at all (none
    fits the target's buffers) raises :class:`UnsupportedKernel` with ``refusal``.
    """
    ordered: Iterable[Tiling] = candidates
    bounds: dict[int, float] = {}
    if bound is not None:
        listed = list(candidates)
        values = [bound(c) for c in listed]
        order = sorted(range(len(listed)), key=values.__getitem__)
        ordered = [listed[i] for i in order]
        bounds = {rank: values[i] for rank, i in enumerate(order)}
    best: tuple[int, int, Tiling] | None = None
    for rank, candidate in enumerate(ordered):
        if best is not None and bound is not None and bounds[rank] > best[0]:
            break
        c = cost(candidate)
        if best is None or (c.cycles, c.stages) < best[:2]:
            best = (c.cycles, c.stages, candidate)
    if best is None:
        raise UnsupportedKernel(refusal)
    return best[2]


def pipe_names(pipes: Iterable[str]) -> str:
    """The pipes as the C++ initializer ``qmsim::begin_kernel`` takes (in header order)."""
    return ", ".join(f'"{p}"' for p in pipes)
