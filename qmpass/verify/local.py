"""Local verification: each rewrite's error where it happens, on captured inputs.

A rewrite replaces the nodes between a few tensors of the graph (its *boundary*): the
inputs of its operators (of a pruned group's producers) and the outputs of its operators
(of a pruned group's consumers, whose width the pruning keeps). Its **local error** is

    ||y' - y|| / ||y||   over the samples,

where ``y`` are the boundary outputs of the original model and ``y'`` those of the
rewritten nodes fed the original model's boundary inputs: the rewrite alone, with no
error coming in from rewrites upstream, measured like the model's verification error
on inputs the plan never saw (the held-out part). The planner's ``predicted_error`` is
its counterpart on the fitting inputs in another unit: a fraction of energy (the square
of such a ratio, of the centred outputs, summed over the step's operators).

The cost is linear in the model: one run of the original model that captures every
boundary tensor, then one run of a *local model* holding, for every rewrite, a copy of
the nodes between its boundary inputs and outputs (tensors renamed apart, weights read
where the rewritten model keeps them). Both run in batches whose captures stay under
``CAPTURE_BYTES``; captures past that in all wait on disk (:mod:`qmpass.spill`), so the
two sessions (a large model's weights, twice) are never held at once.

A rewrite whose nodes read other activations than its boundary inputs (a Gemm's
activation ``C``), or that lives in a subgraph, is not measured. Where another rewrite
prunes channels of a boundary tensor, only its kept channels are fed and compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from qmpass.extract import Extraction
from qmpass.extract.channels import ChannelGroup
from qmpass.extract.shapes import infer_types
from qmpass.plan.plan import Step
from qmpass.spill import Spilled
from qmpass.verify.compare import relative
from qmpass.verify.runner import (
    ORT_ERRORS,
    batch_size,
    feed_batches,
    run_batched,
    session,
    session_with_tensors,
)

__all__ = ["CAPTURE_BYTES", "Boundary", "boundaries", "local_errors"]

#: bytes of captured tensors in one batch, and held in memory in all (the rest on disk)
CAPTURE_BYTES = 256 << 20


@dataclass(frozen=True)
class Boundary:
    """The tensors around one rewrite: fed from the original model at ``inputs``,
    compared with it at ``outputs``. ``narrowed`` are those whose channels another
    rewrite prunes: (name, channel axis, kept channels), fed and compared on the kept
    channels only (what the pruned graph has there when the other rewrite is exact)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    narrowed: tuple[tuple[str, int, tuple[int, ...]], ...] = ()

    def narrow(self, name: str, value: np.ndarray) -> np.ndarray:
        """The original's ``value`` of ``name`` as the rewritten nodes have it."""
        for narrowed, axis, kept in self.narrowed:
            if narrowed == name:
                return np.take(value, kept, axis=axis)
        return value


def boundaries(
    steps: Sequence[Step], extraction: Extraction, groups: Sequence[ChannelGroup]
) -> dict[int, Boundary]:
    """The boundary of each step (by position) that can be measured alone: those on
    operators of the main graph (not a subgraph's)."""
    ops = {op.name: op for op in extraction.operators}
    by_group = {group.name: group for group in groups}
    pruned = {index: by_group[step.group] for index, step in enumerate(steps)
              if step.kind == "prune_channels" and step.group in by_group}
    found: dict[int, Boundary] = {}
    for index, step in enumerate(steps):
        members = [ops[name] for name in step.operators if name in ops]
        if len(members) < len(step.operators) or any(op.graph != "main" for op in members):
            continue
        if step.kind == "prune_channels":
            if index not in pruned:
                continue
            group = by_group[step.group or ""]
            producers = {p.node for p in group.producers}
            consumers = {c.node for c in group.consumers}
            inputs = [op.input for op in members if op.name in producers]
            outputs = [op.output for op in members if op.name in consumers]
        else:
            inputs = [op.input for op in members]
            outputs = [op.output for op in members]
        narrowed = tuple((name, group.channel_axis, tuple(steps[other].kept or ()))
                         for other, group in pruned.items() if other != index
                         for name in dict.fromkeys([*inputs, *outputs])
                         if name in group.tensors)
        if inputs and outputs:
            found[index] = Boundary(tuple(dict.fromkeys(inputs)),
                                    tuple(dict.fromkeys(outputs)), narrowed)
    return found


def local_errors(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    measured: Mapping[int, Boundary],
    feeds: Mapping[str, np.ndarray],
) -> dict[int, float]:
    """The local error (module docstring) of each boundary in ``measured`` that the
    rewritten graph closes, on ``feeds`` of the original model; boundaries it does not
    close, or that onnxruntime cannot run, are left out (when the model of them all
    fails, each is tried alone)."""
    index = _Index.of(rewritten.graph)
    closed = {key: nodes for key, b in measured.items()
              if (nodes := index.between(b)) is not None}
    if not closed:
        return {}
    wanted = sorted({t for k in closed for t in (*measured[k].inputs, *measured[k].outputs)})
    try:
        captured = _captures(original, wanted, feeds)
    except _FAILURES:  # some boundary tensor cannot be captured: each boundary alone
        if len(closed) == 1:
            return {}
        return {key: error for one in closed
                for key, error in local_errors(original, rewritten, {one: measured[one]},
                                               feeds).items()}

    def compared(keys: Iterable[int]) -> dict[int, float]:
        chosen = {k: measured[k] for k in keys}
        local, names = _local_model(original, rewritten, chosen, {k: closed[k] for k in keys})
        return _compared(session(local), captured, wanted, chosen, names)

    try:
        return compared(closed)
    except _FAILURES:  # a local model fails: each boundary alone, on the same captures
        if len(closed) == 1:
            return {}
    found: dict[int, float] = {}
    for key in closed:
        try:
            found.update(compared([key]))
        except _FAILURES:
            continue
    return found


#: what makes a local model fail: onnxruntime, or shapes the boundary did not foresee
_FAILURES: tuple[type[Exception], ...] = (*ORT_ERRORS, ValueError, IndexError)
#: captured batches: in memory, or parked on disk when they pass CAPTURE_BYTES together
_Captured = list[list[np.ndarray] | list[Spilled]]


def _captures(original: onnx.ModelProto, wanted: list[str],
              feeds: Mapping[str, np.ndarray]) -> _Captured:
    """The original's ``wanted`` tensors on ``feeds``, a batch at a time (its session is
    gone before the local model's starts: a large model's weights are not held twice)."""
    capture = session_with_tensors(original, wanted)
    batches: _Captured = []
    held = 0
    for chunk in _chunks(capture, feeds, wanted):
        values = run_batched(capture, chunk, outputs=wanted)
        held += sum(np.asarray(v).nbytes for v in values)
        batches.append([Spilled(np.asarray(v)) for v in values] if held > CAPTURE_BYTES
                       else values)
    return batches


def _compared(
    local_session: ort.InferenceSession,
    captured: _Captured,
    wanted: list[str],
    measured: Mapping[int, Boundary],
    names: Mapping[int, Mapping[str, str]],
) -> dict[int, float]:
    """Each boundary's local error: the local model run on the captured inputs against
    the captured outputs."""
    index = {name: i for i, name in enumerate(wanted)}
    squared = dict.fromkeys(measured, 0.0)
    reference = dict.fromkeys(measured, 0.0)
    local_out = [names[k][name] for k in measured for name in measured[k].outputs]
    for batch in captured:
        values = [v.load() if isinstance(v, Spilled) else v for v in batch]
        local_feeds = {names[k][name]: b.narrow(name, values[index[name]])
                       for k, b in measured.items() for name in b.inputs}
        computed = dict(zip(local_out, local_session.run(local_out, local_feeds), strict=True))
        for key, boundary in measured.items():
            for name in boundary.outputs:
                y = boundary.narrow(name, np.asarray(values[index[name]], np.float64))
                change = np.asarray(computed[names[key][name]], dtype=np.float64) - y
                squared[key] += float(np.sum(change * change))
                reference[key] += float(np.sum(y * y))
    return {key: relative(squared[key], reference[key]) for key in measured}


def _chunks(capture: ort.InferenceSession, feeds: Mapping[str, np.ndarray], wanted: list[str]
            ) -> Iterable[dict[str, np.ndarray]]:
    """``feeds`` in batches whose captured tensors stay under ``CAPTURE_BYTES``, sized by
    a first run on one sample (the whole feeds when they cannot be split)."""
    total = batch_size(capture, feeds)
    if total is None or total <= 1:
        yield dict(feeds)
        return
    first = {name: array[:1] for name, array in feeds.items()}
    per_sample = sum(np.asarray(v).nbytes for v in run_batched(capture, first, outputs=wanted))
    batch = max(1, CAPTURE_BYTES // (2 * max(per_sample, 1)))
    yield from feed_batches(capture, feeds, batch)


@dataclass(frozen=True)
class _Index:
    """A graph's nodes by the tensors they write, its constants, and the nodes' order."""

    producer: dict[str, onnx.NodeProto]
    constants: set[str]
    order: dict[int, int]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _Index:
        return cls({out: node for node in graph.node for out in node.output if out},
                   {t.name for t in graph.initializer},
                   {id(node): i for i, node in enumerate(graph.node)})

    def between(self, boundary: Boundary) -> list[onnx.NodeProto] | None:
        """The nodes that compute ``boundary.outputs`` from its inputs and constants, in
        graph order; None when they read any other activation."""
        stop = set(boundary.inputs)
        taken: dict[int, onnx.NodeProto] = {}
        pending = list(boundary.outputs)
        while pending:
            name = pending.pop()
            if name in stop or name in self.constants or not name:
                continue
            node = self.producer.get(name)
            if node is None:  # a graph input that is not on the boundary
                return None
            if id(node) in taken:
                continue
            taken[id(node)] = node
            pending.extend(node.input)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in taken.values() for a in node.attribute):
            return None  # a subgraph may read outer-scope activations
        return sorted(taken.values(), key=lambda node: self.order[id(node)])


def _local_model(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    measured: Mapping[int, Boundary],
    nodes: Mapping[int, list[onnx.NodeProto]],
) -> tuple[onnx.ModelProto, dict[int, dict[str, str]]]:
    """One model computing every boundary's outputs from its inputs, each boundary's
    tensors renamed ``u<key>/<name>`` (so they are apart even where two rewrites' nodes
    overlap); with the map from original names to local ones per boundary."""
    inits = {t.name: t for t in rewritten.graph.initializer}
    boundary_names = sorted({t for b in measured.values() for t in (*b.inputs, *b.outputs)})
    types = infer_types(original, boundary_names)
    graph = onnx.GraphProto(name="qmpass_local")
    used: set[str] = set()
    names: dict[int, dict[str, str]] = {}
    for key, boundary in measured.items():
        prefix = f"u{key}/"
        renamed: dict[str, str] = {}

        def local(name: str, renamed: dict[str, str] = renamed, prefix: str = prefix) -> str:
            if not name or name in inits:
                return name
            return renamed.setdefault(name, prefix + name)

        for node in nodes[key]:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + node.name
            copy.input[:] = [local(name) for name in node.input]
            copy.output[:] = [local(name) for name in node.output]
            used.update(name for name in node.input if name in inits)
            graph.node.append(copy)
        for name in boundary.inputs:
            graph.input.append(helper.make_tensor_value_info(
                local(name), types.get(name, TensorProto.FLOAT), None))
        for name in boundary.outputs:
            graph.output.append(helper.make_tensor_value_info(
                local(name), types.get(name, TensorProto.FLOAT), None))
        names[key] = dict(renamed)
    graph.initializer.extend(inits[name] for name in sorted(used))
    model = helper.make_model(graph, opset_imports=list(rewritten.opset_import),
                              ir_version=max(rewritten.ir_version, 4))  # inits not inputs
    return model, names
