"""The report of a budget-gated model (:func:`~qmpass.compress.gated.compress_gated`):
one row per level, and the level table the CLI, ``bench/gated.py`` and docs/GATED.md
print."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qmpass.plan.plan import Plan
from qmpass.verify import Verification

__all__ = ["GatedReport", "LevelRow", "stored_params"]


@dataclass(frozen=True)
class LevelRow:
    """One level: its budget and plan, the weight operators' parameters and FLOPs in
    use, the held-out error against the original, the median onnxruntime latency of the
    gated model at this level, and the standalone compression at the same budget (None
    when it was not asked for; at budget 1 the standalone model is the original)."""

    level: int
    budget: float
    plan: Plan
    params: int
    flops: int
    verification: Verification
    latency_ms: float
    standalone: Verification | None = None
    standalone_latency_ms: float | None = None
    standalone_kept: float | None = None

    @property
    def nesting_cost(self) -> float | None:
        """The level's held-out error minus the standalone model's (None if not measured)."""
        if self.standalone is None:
            return None
        return self.verification.relative_error - self.standalone.relative_error

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "budget": self.budget,
            "keep_planned": self.plan.kept,
            "operator_params": self.params,
            "operator_flops": self.flops,
            "ranks": {", ".join(s.operators): s.rank for s in self.plan.steps},
            "verification": self.verification.to_dict(),
            "latency_ms": self.latency_ms,
            "standalone": None if self.standalone is None else {
                "verification": self.standalone.to_dict(),
                "latency_ms": self.standalone_latency_ms,
                "keep_achieved": self.standalone_kept,
                "nesting_cost": self.nesting_cost,
            },
            "notes": list(self.plan.notes),
        }


@dataclass(frozen=True)
class GatedReport:
    """``levels``: one :class:`LevelRow` per budget; ``declined``: operators left dense at
    every level, with why; the original's parameters, FLOPs and latency beside the gated
    model's stored parameters (every level's factors, tables and dense weights)."""

    model: str
    method: str
    resource: str
    levels: tuple[LevelRow, ...]
    declined: tuple[tuple[str, str], ...]
    params: tuple[int, int]  # stored: the original's, the gated model's
    operator_params: int  # the original's weight operators
    operator_flops: int
    latency_ms: float  # the original's
    default_is_level_0: bool  # a run without budget_level computed level 0, bit for bit
    samples: tuple[int, int] = (0, 0)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    pricing: str = "layer"  # the levels' errors: "output" (measured gains) or each unit's own
    gains: tuple[tuple[str, float], ...] = ()  # output pricing: each unit's measured gain

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "resource": self.resource,
            "pricing": self.pricing,
            "gains": dict(self.gains),
            "budgets": [row.budget for row in self.levels],
            "levels": [row.to_dict() for row in self.levels],
            "params_before": self.params[0],
            "params_stored": self.params[1],
            "operator_params_before": self.operator_params,
            "operator_flops_before": self.operator_flops,
            "latency_ms_before": self.latency_ms,
            "default_is_level_0": self.default_is_level_0,
            "declined_operators": [{"operator": n, "reason": r} for n, r in self.declined],
            "calibration_samples": {"fit": self.samples[0], "held_out": self.samples[1]},
            "notes": list(self.notes),
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """The level table (markdown)."""
        lines = [
            "| level | budget | params in use | FLOPs in use | held-out error | latency ms "
            "| standalone error | nesting cost | standalone latency ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| original | - | {self.operator_params:,} | {self.operator_flops:,} | 0 | "
            f"{self.latency_ms:.3f} | - | - | - |",
        ]
        for row in self.levels:
            alone = row.standalone
            lines.append(
                f"| {row.level} | {row.budget:g} | {row.params:,} | {row.flops:,} | "
                f"{row.verification.relative_error:.4g} | {row.latency_ms:.3f} | "
                + ("- | - | - |" if alone is None else
                   f"{alone.relative_error:.4g} | {row.nesting_cost:+.4g} | "
                   f"{row.standalone_latency_ms:.3f} |"))
        return "\n".join(lines)


def stored_params(model: onnx.ModelProto) -> int:
    """Floating-point values the model stores, in every graph (an ``If``'s branches
    included): initializers and Constant nodes."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}
    return sum(int(np.prod(t.dims)) for t in _tensors(model.graph) if t.data_type in floats)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                yield attr.t
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _tensors(sub)
