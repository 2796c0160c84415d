"""hw_targets: NPU-style targets simulated on the CPU (docs/TARGETS.md).

One package per target (``cpu``, ``ascend``, ``mlu``, ``kunlunxin``), each split into its
description as data (``target.py``), its cost model (``cost.py``) and its emitter
(``emit.py``, which fills in the kernel templates of ``templates/<target>/``); in
``include/``, the header that gives its intrinsics their meaning on the CPU. What the
targets share (the contract, the dispatch on kernel kinds, the tiling search, the grid of
tiles) is in :mod:`hw_targets.base`. qmpass uses only what this package exports.
"""

from __future__ import annotations

import importlib

from hw_targets.base import (
    KernelCost,
    KernelSource,
    Param,
    Target,
    TargetModule,
    Tiling,
    UnsupportedKernel,
    roofline,
)
from hw_targets.lower import Lowering, lower_conv, lower_matmul, simulate_all, write_bundle
from hw_targets.sim import CompileError, SimulationFault
from hw_targets.spec import GemmSpec, Im2colSpec, KernelSpec
from hw_targets.weights import ConvLayer, conv_weight, op_type_weights

__all__ = [
    "TARGET_NAMES",
    "CompileError",
    "ConvLayer",
    "GemmSpec",
    "Im2colSpec",
    "KernelCost",
    "KernelSource",
    "KernelSpec",
    "Lowering",
    "Param",
    "SimulationFault",
    "Target",
    "TargetModule",
    "Tiling",
    "UnknownTarget",
    "UnsupportedKernel",
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
