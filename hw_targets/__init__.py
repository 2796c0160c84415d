"""hw_targets: NPU-style targets simulated on the CPU (TARGETS.md).

One module per target (``cpu``, ``ascend``, ``mlu``, ``kunlunxin``), each with its
description as data, its cost model, its code emitter and, in ``include/``, the header
that gives its intrinsics their meaning on the CPU. qmpass uses only what this package
exports.
"""

from __future__ import annotations

import importlib

from hw_targets.base import Cost, KernelSource, Param, Target, TargetModule, Tiling, roofline
from hw_targets.lower import Lowering, lower_conv, lower_matmul, simulate_all, write_bundle
from hw_targets.sim import CompileError, SimulationFault
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec
from hw_targets.weights import ConvLayer, conv_weight, op_type_weights

__all__ = [
    "TARGET_NAMES",
    "CompileError",
    "ConvLayer",
    "Cost",
    "GemmSpec",
    "Im2colSpec",
    "KernelSource",
    "KernelSpec",
    "Lowering",
    "Param",
    "SimulationFault",
    "Target",
    "TargetModule",
    "Tiling",
    "UnknownTarget",
    "conv_weight",
    "get_target",
    "lower_conv",
    "lower_matmul",
    "op_type_weights",
    "roofline",
    "simulate_all",
    "write_bundle",
]

TARGET_NAMES = ("ascend", "mlu", "kunlunxin", "cpu")


class UnknownTarget(ValueError):
    """A target name that is not one of :data:`TARGET_NAMES`."""


def get_target(name: str) -> TargetModule:
    """The module of target ``name`` (its ``TARGET`` is the default description)."""
    if name not in TARGET_NAMES:
        raise UnknownTarget(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    module: TargetModule = importlib.import_module(f"hw_targets.{name}")  # type: ignore[assignment]
    return module
