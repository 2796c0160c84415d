"""Applying plan steps to a model: pick the rewrite for each step, check, apply, export.

Only here are the rewrites put together; each of them lives in its own file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qmpass.extdata import is_external, tensor_array, without_external
from qmpass.extract import Extraction, Operator
from qmpass.extract.channels import ChannelGroup
from qmpass.plan.plan import Step
from qmpass.rewrite.base import Rewrite, export_like
from qmpass.rewrite.lowrank_conv import LowRankConv
from qmpass.rewrite.lowrank_matmul import LowRankMatMul
from qmpass.rewrite.prune_channels import PruneChannels
from qmpass.rewrite.shared_basis import SharedBasis
from qmpass.rewrite.shared_basis_crosslayer import CrossLayerSharedBasis

__all__ = ["Applier"]

#: what a rewritten graph that breaks onnx's rules raises (checker, shape inference)
_INVALID = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)


class Applier:
    """Builds the model with a chosen subset of a plan's steps, on a fresh import of the
    model each time (so leaving a step out is how a step is rolled back).

    ``model`` is named by :func:`~qmpass.rewrite.base.name_nodes`; ``extraction`` and
    ``groups`` are its operators and channel groups.
    """

    def __init__(
        self, model: onnx.ModelProto, extraction: Extraction, groups: Sequence[ChannelGroup]
    ) -> None:
        self.model = model
        self.ops: dict[str, Operator] = {op.name: op for op in extraction.operators}
        self.prune = PruneChannels(groups)
        self.matmul, self.conv, self.shared = LowRankMatMul(), LowRankConv(), SharedBasis()
        self.crosslayer = CrossLayerSharedBasis()

    @cached_property
    def surgery_refused(self) -> str | None:
        """Why onnx-graphsurgeon cannot round-trip the model untouched (None if it can).
        Its exporter fails on some value types (optional tensors in subgraphs): a
        limitation of the library, told apart here from a failure of a rewrite."""
        try:
            export_like(gs.import_onnx(self.model), self.model)
        except Exception as exc:
            return (f"onnx-graphsurgeon cannot import and export this graph "
                    f"({type(exc).__name__}: {exc}); the model is left as it is")
        return None

    def rewrite_for(self, step: Step) -> Rewrite:
        if step.kind == "prune_channels":
            return self.prune
        if step.kind == "shared_basis":
            return self.shared
        if step.kind == "crosslayer_basis":
            return self.crosslayer
        op = self.ops.get(step.operators[0])
        return self.conv if op is not None and op.op_type == "Conv" else self.matmul

    def build(
        self, steps: Sequence[tuple[Step, Mapping[str, np.ndarray]]]
    ) -> tuple[onnx.ModelProto, dict[int, str]]:
        """The model with ``steps`` applied and, by position, the steps that declined
        (with why). The result passes ``onnx.checker`` and keeps the model's interface.

        No steps is the model itself; a model onnx-graphsurgeon cannot carry through an
        import and export unchanged declines every step (:attr:`surgery_refused`, asked
        only when a build fails: otherwise the failure is a rewrite's, and raised)."""
        if not steps:
            return self.model, {}
        try:
            return self._build(steps)
        except _INVALID as exc:
            if self.surgery_refused is not None:
                return self.model, dict.fromkeys(range(len(steps)), self.surgery_refused)
            return self._without_invalid(steps, exc)
        except Exception:
            if self.surgery_refused is None:
                raise
            return self.model, dict.fromkeys(range(len(steps)), self.surgery_refused)

    def _without_invalid(
        self, steps: Sequence[tuple[Step, Mapping[str, np.ndarray]]], exc: Exception
    ) -> tuple[onnx.ModelProto, dict[int, str]]:
        """The model without the steps whose rewrite alone fails ``onnx.checker`` (a
        qmpass bug, which must not cost the user their run), each declined with why."""
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        every = dict.fromkeys(range(len(steps)), f"the rewritten graph fails onnx.checker "
                              f"({line}); left out (a qmpass bug: please report it)")
        if len(steps) == 1:
            return self.model, every
        bad = {i: why for i, step in enumerate(steps)
               for why in self.build([step])[1].values()}
        if not bad:  # each step is valid alone, not together
            return self.model, every
        kept = [i for i in range(len(steps)) if i not in bad]
        model, declined = self.build([steps[i] for i in kept])
        return model, {**bad, **{kept[i]: why for i, why in declined.items()}}

    def _build(
        self, steps: Sequence[tuple[Step, Mapping[str, np.ndarray]]]
    ) -> tuple[onnx.ModelProto, dict[int, str]]:
        graph = gs.import_onnx(self.model)
        _read_external(graph)
        declined: dict[int, str] = {}
        for index, (step, arrays) in enumerate(steps):
            rewrite = self.rewrite_for(step)
            reason = rewrite.check(graph, step, self.ops) or rewrite.check_tensors(
                step, self.ops, arrays
            )
            if reason is not None:
                declined[index] = reason
                continue
            rewrite.apply(graph, step, self.ops, arrays)
        model = export_like(graph, self.model)
        # external tensors stay references into the input's files: checked as inputs
        onnx.checker.check_model(without_external(model, large=True), full_check=True)
        _check_interface(self.model, model)
        return model, declined


class _ExternalValues(gs.ir.tensor.LazyValues):  # type: ignore[misc]
    """onnx-graphsurgeon's lazy values of an external tensor, read from the model's folder
    (its own reader looks in the working directory); exported as the same reference."""

    def load(self) -> np.ndarray:
        return np.array(tensor_array(self.tensor))


def _read_external(graph: gs.Graph) -> None:
    """Let the rewrites read the values of external-data constants (slicing a weight)."""
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(values, gs.ir.tensor.LazyValues) and is_external(values.tensor):
            tensor._values = _ExternalValues(values.tensor)


def _check_interface(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """Rewrites must keep the model's inputs, outputs and opsets exactly."""
    for kind in ("input", "output"):
        before = [v.SerializeToString() for v in getattr(original.graph, kind)]
        after = [v.SerializeToString() for v in getattr(rewritten.graph, kind)]
        if before != after:
            raise RuntimeError(f"a rewrite changed the graph {kind}s")
    if list(original.opset_import) != list(rewritten.opset_import) or \
            original.ir_version != rewritten.ir_version:
        raise RuntimeError("a rewrite changed the opset or IR version")
