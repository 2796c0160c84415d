"""The whole-model form of a budget-gated model: one ``If`` chain on the level at the top
of the graph, each branch the model's nodes as one level computes them, every constant
stored once in the main graph and read by the branches that use it.

:func:`~qmpass.rewrite.gated_lowrank.build_gated` writes each level as a model of its
own (the gated operators at the level's rank as constant factor pairs, the others as
they are) and this module joins them:

    level = Gather(0 .. L-1, budget_level)
    outputs = If(level < s_1) { branch 0 } else If(level < s_2) { branch 1 } ... else { last }

where ``s_j`` is the first level of branch ``j`` (levels that compute the same map share
a branch). An initializer only one branch reads (a level's factor pairs, the dense
weights of the levels that leave an operator dense) stays in that branch, where
onnxruntime pre-packs it; one that several branches read with the same name and
contents (weights of operators no level changes, a pair two levels share) is stored once
in the main graph if it is a weight or large (:data:`SHARED_SIZE`), and copied into each
branch otherwise (shapes, biases, norms' scales: where constant folding and fusions see
it). In a probe while building this (onnxruntime 1.31, batch 450; not in ``bench/``),
a weight read from two scopes up ran about 13 % slower than a branch's own, one scope
up no slower. A level thus runs about
as a standalone model of its budget plus one ``Gather`` and an ``If`` per distinct level
above it (``bench/gated.py``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["SHARED_SIZE", "switch_model"]

#: initializers several levels read that have fewer values and are no MatMul's or Gemm's
#: weight are copied into each branch that reads them (shapes, axes, biases, norms'
#: scales: onnxruntime folds and fuses with a branch's own constants, not the outer
#: scope's); shared weights and larger ones are stored once in the main graph
SHARED_SIZE = 4096


def switch_model(model: onnx.ModelProto, levels: Sequence[onnx.ModelProto],
                 starts: Sequence[int], level_input: str, count: int) -> onnx.ModelProto:
    """``model``'s envelope and interface plus the int64 scalar ``level_input``, computing
    ``levels[j]`` for the levels from ``starts[j]`` (increasing, ``starts[0] == 0``) up
    to the next start, of ``count`` levels in all."""
    uses = Counter(_key(t) for level in levels for t in level.graph.initializer)
    shared = {key for key, n in uses.items() if n > 1}
    stored: dict[str, onnx.TensorProto] = {}
    branches = [_branch(level, f"level{starts[j]}", stored, shared, model.graph.output)
                for j, level in enumerate(levels)]
    checked = f"{level_input}/checked"
    tables = [numpy_helper.from_array(np.arange(count, dtype=np.int64), f"{level_input}/levels")]
    nodes = [helper.make_node("Gather", [tables[0].name, level_input], [checked],
                              f"{level_input}/Gather", axis=0)]
    outputs = [o.name for o in model.graph.output]
    chain: onnx.GraphProto | None = None  # built from the last branch up
    for j in range(len(branches) - 1, 0, -1):
        bound = numpy_helper.from_array(np.array(starts[j], dtype=np.int64),
                                        f"{level_input}/below{starts[j]}")
        tables.append(bound)
        taken = f"{level_input}/below{starts[j]}/taken"
        names = outputs if j == 1 else [f"{level_input}/chain{starts[j - 1]}/{n}"
                                        for n in outputs]
        if_nodes = [helper.make_node("Less", [checked, bound.name], [taken],
                                     f"{level_input}/Less{starts[j]}"),
                    helper.make_node("If", [taken], names, f"{level_input}/If{starts[j]}",
                                     then_branch=branches[j - 1],
                                     else_branch=chain or branches[j])]
        if j == 1:
            nodes += if_nodes
        else:
            chain = helper.make_graph(if_nodes, f"chain{starts[j - 1]}", [],
                                      _records(model.graph.output, names))
    if len(branches) == 1:  # every level computes the same map
        nodes += [helper.make_node("Identity", [o.name], [n])
                  for o, n in zip(branches[0].output, outputs, strict=True)]
        nodes[1:1] = list(branches[0].node)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = helper.make_graph(nodes, model.graph.name, list(model.graph.input),
                              list(model.graph.output), [*stored.values(), *tables])
    graph.metadata_props.extend(model.graph.metadata_props)
    out.graph.CopyFrom(graph)
    return out


def _records(records: Sequence[onnx.ValueInfoProto], names: Sequence[str]
             ) -> list[onnx.ValueInfoProto]:
    out = []
    for record, name in zip(records, names, strict=True):
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(record)
        copy.name = name
        out.append(copy)
    return out


def _key(tensor: onnx.TensorProto) -> tuple[str, str]:
    return tensor.name, hashlib.sha256(tensor.SerializeToString()).hexdigest()


def _branch(level: onnx.ModelProto, prefix: str, stored: dict[str, onnx.TensorProto],
            shared: set[tuple[str, str]], outputs: Sequence[onnx.ValueInfoProto]
            ) -> onnx.GraphProto:
    """The nodes of ``level`` as a branch: every value they produce renamed under
    ``prefix``. Of its initializers, the weights (a MatMul's or Gemm's second input) and
    those of ``SHARED_SIZE`` values or more that other levels read too (same name and
    contents: ``shared``) are moved into ``stored`` (one of another's name but other
    contents renamed); the others stay in the branch, renamed where the main graph has
    their name."""
    rename: dict[str, str] = {}
    weights = {n.input[1] for n in level.graph.node
               if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    taken = {name for name, _ in shared}
    own = []
    for tensor in level.graph.initializer:
        if _key(tensor) not in shared or (tensor.name not in weights
                                          and int(np.prod(tensor.dims)) < SHARED_SIZE):
            if tensor.name in taken:  # not the outer scope's tensor of that name
                rename[tensor.name] = f"{prefix}/{tensor.name}"
            own.append(_named(tensor, rename.get(tensor.name, tensor.name)))
            continue
        kept = stored.get(tensor.name)
        if kept is None:
            stored[tensor.name] = tensor
        elif _key(kept) != _key(tensor):
            rename[tensor.name] = f"{prefix}/{tensor.name}"
            stored[rename[tensor.name]] = _named(tensor, rename[tensor.name])
    for node in level.graph.node:
        for name in node.output:
            if name:
                rename[name] = f"{prefix}/{name}"
    nodes = []
    for node in level.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}/{node.name}"
        _rename(copy, rename)
        nodes.append(copy)
    names = []
    for record in outputs:
        name = rename.get(record.name)
        if name is None or name in stored:  # an input or a constant passed through
            name = f"{prefix}/{record.name}"
            nodes.append(helper.make_node("Identity", [rename.get(record.name, record.name)],
                                          [name], f"{prefix}/Identity/{record.name}"))
        names.append(name)
    return helper.make_graph(nodes, prefix, [], _records(outputs, names), own)


def _named(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    if tensor.name == name:
        return tensor
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _rename(node: onnx.NodeProto, rename: dict[str, str]) -> None:
    """``node``'s inputs and outputs (and those of its subgraphs, which read the outer
    scope by name) renamed by ``rename``."""
    node.input[:] = [rename.get(n, n) for n in node.input]
    node.output[:] = [rename.get(n, n) for n in node.output]
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for inner in sub.node:
                _rename(inner, rename)
            for record in sub.output:
                record.name = rename.get(record.name, record.name)
