"""The whole-model form of a budget-gated model: a flat chain of ``If``s on the level in
the main graph, each branch the model's nodes as one level computes them, every constant
stored once and read by the branches that use it from at most one scope up.

:func:`~qmpass.rewrite.gated_lowrank.build_gated` writes each level as a model of its
own (the gated operators at the level's rank as constant factor pairs, the others as
they are) and this module joins them:

    branch = Gather(branch_of_level, budget_level)        # checks the level
    t_0 = If(branch == 0) { branch 0 } else { empty tensors }
    t_j = If(branch == j) { branch j } else { t_(j-1) }    # the last writes the outputs

(levels that compute the same map share a branch). Every branch is one scope below the
main graph. That is the point of the flat chain: onnxruntime (1.31) pre-packs a
MatMul's constant weight when it is an initializer of the MatMul's own graph or of the
graph right above it, not one stored two or more scopes up, which then runs unpacked
(measured: 1.45x the time of one 1024 x 1024 MatMul at 64 rows, the same as with
pre-packing switched off; 1.8-2x per MatMul on the ``small`` LLaMA layout, whose lower
levels, nested two scopes deep in an ``If`` chain as this module first wrote them, took
1.35-1.39x their standalone models; docs/GATED.md). A run pays one ``Gather``, an
``Equal`` and an ``If`` per branch, and the branches after its own pass its outputs on.

An initializer only one branch reads (a level's factor pairs, the dense weights of the
levels that leave an operator dense) stays in that branch; one that several branches
read with the same name and contents (weights of operators no level changes, a pair two
levels share) is stored once in the main graph if it is a weight or large
(:data:`SHARED_SIZE`), and copied into each branch otherwise (shapes, biases, norms'
scales: where constant folding and fusions see it).
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
    to the next start, of ``count`` levels in all: a flat chain of ``If``s in the main
    graph (module docstring), every branch one scope below the weights it shares."""
    uses = Counter(_key(t) for level in levels for t in level.graph.initializer)
    shared = {key for key, n in uses.items() if n > 1}
    stored: dict[str, onnx.TensorProto] = {}
    branches = [_branch(level, f"level{starts[j]}", stored, shared, model.graph.output)
                for j, level in enumerate(levels)]
    outputs = [o.name for o in model.graph.output]
    if len(branches) == 1:  # every level computes the same map
        checked = f"{level_input}/checked"
        tables = [numpy_helper.from_array(np.arange(count, dtype=np.int64),
                                          f"{level_input}/levels")]
        nodes = [helper.make_node("Gather", [tables[0].name, level_input], [checked],
                                  f"{level_input}/Gather", axis=0),
                 *branches[0].node,
                 *(helper.make_node("Identity", [o.name], [n])
                   for o, n in zip(branches[0].output, outputs, strict=True))]
    else:
        nodes, tables = _chain(branches, starts, level_input, count, model.graph.output)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = helper.make_graph(nodes, model.graph.name, list(model.graph.input),
                              list(model.graph.output), [*stored.values(), *tables])
    graph.metadata_props.extend(model.graph.metadata_props)
    out.graph.CopyFrom(graph)
    return out


def _chain(branches: Sequence[onnx.GraphProto], starts: Sequence[int], level_input: str,
           count: int, records: Sequence[onnx.ValueInfoProto]
           ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The main graph's nodes selecting a branch (and their constants): the level's
    branch gathered from a table (which checks the level), then per branch ``j`` an
    ``If(branch == j) { branch j } else { the previous If's outputs }``, the first
    ``else`` passing empty tensors, the last ``If`` writing the graph's outputs."""
    index = np.searchsorted(np.asarray(starts), np.arange(count), side="right") - 1
    table = numpy_helper.from_array(index.astype(np.int64), f"{level_input}/branches")
    taken = f"{level_input}/branch"
    tables = [table]
    nodes = [helper.make_node("Gather", [table.name, level_input], [taken],
                              f"{level_input}/Gather", axis=0)]
    previous = []
    for i, record in enumerate(records):
        kind = record.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
        rank = len(record.type.tensor_type.shape.dim)
        empty = np.zeros((0,) * max(rank, 1), helper.tensor_dtype_to_np_dtype(kind))
        tables.append(numpy_helper.from_array(empty, f"{level_input}/empty{i}"))
        previous.append(tables[-1].name)
    for j, branch in enumerate(branches):
        bound = numpy_helper.from_array(np.array(j, dtype=np.int64), f"{level_input}/is{j}")
        tables.append(bound)
        last = j == len(branches) - 1
        names = [r.name if last else f"{level_input}/after{starts[j]}/{r.name}"
                 for r in records]
        passed = [f"{level_input}/pass{starts[j]}/{r.name}" for r in records]
        keep = helper.make_graph(
            [helper.make_node("Identity", [p], [n], f"{level_input}/pass{starts[j]}/{i}")
             for i, (p, n) in enumerate(zip(previous, passed, strict=True))],
            f"pass{starts[j]}", [], _records(records, passed, shaped=False))
        nodes += [helper.make_node("Equal", [taken, bound.name], [f"{taken}/is{j}"],
                                   f"{level_input}/Equal{j}"),
                  helper.make_node("If", [f"{taken}/is{j}"], names,
                                   f"{level_input}/If{starts[j]}", then_branch=branch,
                                   else_branch=keep)]
        previous = names
    return nodes, tables


def _records(records: Sequence[onnx.ValueInfoProto], names: Sequence[str],
             shaped: bool = True) -> list[onnx.ValueInfoProto]:
    """``records`` renamed ``names`` (without their shapes unless ``shaped``)."""
    out = []
    for record, name in zip(records, names, strict=True):
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(record)
        copy.name = name
        if not shaped:
            copy.type.tensor_type.ClearField("shape")
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
