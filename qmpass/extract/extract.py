"""Find the weight-bearing operators of an ONNX graph (read-only).

Handled: MatMul (constant on either side), Gemm (``transA``, ``transB``, ``alpha``,
``beta``, bias ``C``), Conv 1-D/2-D/3-D (grouped, depthwise, dilated), ConvTranspose;
weights from initializers, ``Constant`` nodes, external data or constant subgraphs; a
bias ``Add`` after MatMul; a ``BatchNormalization`` after Conv; operators inside
``If``/``Loop``/``Scan`` bodies. Everything else that carries weights (quantized ops,
recurrent ops, custom domains) is listed as skipped or unsupported with a reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import onnx
import scipy.linalg
from onnx import helper

from qmpass.algebra.fold import fold_batchnorm
from qmpass.errors import QmpassInputError
from qmpass.extdata import HeldArray, LazyArray, current_folder, is_external
from qmpass.extract.constants import ConstantScope
from qmpass.extract.operator import ConvGeometry, Operator, Skipped
from qmpass.extract.shapes import Shape, infer_shapes

__all__ = [
    "Extraction",
    "extract_operators",
    "fusion_groups",
]

_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
_NOT_ANALYSED = {
    "QLinearConv": "quantized operator",
    "QLinearMatMul": "quantized operator",
    "MatMulInteger": "quantized operator",
    "ConvInteger": "quantized operator",
    "LSTM": "recurrent operator (gate weights are not one affine map)",
    "GRU": "recurrent operator (gate weights are not one affine map)",
    "RNN": "recurrent operator (gate weights are not one affine map)",
    "Einsum": "Einsum is not analysed",
}


@dataclass(frozen=True)
class Extraction:
    """What extraction found. ``fusion_groups`` lists operators that read one tensor and
    could become one wider operator (same kind, same geometry), each of two or more."""

    operators: tuple[Operator, ...]
    skipped: tuple[Skipped, ...]
    unsupported: tuple[Skipped, ...]
    fusion_groups: tuple[tuple[str, ...], ...]
    opset: int
    ir_version: int


def extract_operators(model: onnx.ModelProto, external: frozenset[str] = frozenset()) -> Extraction:
    """Return the operators of ``model`` without modifying it.

    ``external`` names initializers that were read from external data files (see
    :class:`qmpass.modelio.LoadedModel`), so their source can be reported.
    """
    opsets = {o.domain or "": o.version for o in model.opset_import}
    walker = _Walker(infer_shapes(model), opsets)
    walker.walk(model.graph, ConstantScope(model.graph, opsets, external=external), "main")
    return Extraction(
        operators=tuple(walker.operators),
        skipped=tuple(walker.skipped),
        unsupported=tuple(walker.unsupported),
        fusion_groups=fusion_groups(walker.operators),
        opset=opsets.get("", 0),
        ir_version=model.ir_version,
    )


def fusion_groups(operators: Sequence[Operator]) -> tuple[tuple[str, ...], ...]:
    """Operators of one graph reading one tensor with one kind and geometry, two or more
    per group (shared by the Relax extraction)."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for op in operators:
        if op.op_type in ("MatMul", "Gemm") and op.weight_side == "right":
            kind = f"matmul:{op.shape[1]}"
        elif op.op_type == "Conv" and op.geometry is not None and op.geometry.groups == 1:
            kind = f"conv:{op.geometry}"
        else:
            continue
        groups[(op.graph, op.input, kind)].append(op.name)
    return tuple(tuple(names) for names in groups.values() if len(names) > 1)


class _Walker:
    def __init__(self, shapes: dict[str, Shape], opsets: dict[str, int]) -> None:
        self.shapes = shapes
        self.opsets = opsets
        self.operators: list[Operator] = []
        self.skipped: list[Skipped] = []
        self.unsupported: list[Skipped] = []
        self._names: set[str] = set()

    def walk(self, graph: onnx.GraphProto, scope: ConstantScope, path: str) -> None:
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)
        graph_outputs = {o.name for o in graph.output}
        for index, node in enumerate(graph.node):
            name = self._unique(node.name or f"{node.op_type}_{index}")
            for attr in node.attribute:
                subgraphs = (
                    [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                )
                for k, sub in enumerate(subgraphs):
                    suffix = attr.name if len(subgraphs) == 1 else f"{attr.name}[{k}]"
                    self.walk(sub, scope.child(sub), f"{path}/{name}.{suffix}")
            if node.domain not in ("", "ai.onnx"):
                self.unsupported.append(
                    Skipped(
                        name, node.op_type, path, f"op of domain '{node.domain}' left untouched"
                    )
                )
            elif node.op_type in _NOT_ANALYSED:
                self.skipped.append(Skipped(name, node.op_type, path, _NOT_ANALYSED[node.op_type]))
            elif node.op_type in _WEIGHT_OPS:
                match = _Match(node, name, path, scope, self.shapes, consumers, graph_outputs)
                try:
                    result = match.extract()
                except QmpassInputError:
                    raise
                except (IndexError, KeyError, TypeError, ValueError) as exc:
                    # a node that breaks the spec (missing inputs, odd attributes) is
                    # reported, not fatal: the rest of the graph is still analysed
                    result = f"not understood ({type(exc).__name__}: {exc})"
                if isinstance(result, Operator):
                    self.operators.append(result)
                else:
                    self.skipped.append(Skipped(name, node.op_type, path, result))

    def _unique(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self._names:
            k += 1
            candidate = f"{name}#{k}"
        self._names.add(candidate)
        return candidate


class _Match:
    """Extraction of one MatMul/Gemm/Conv/ConvTranspose node; returns an Operator or why not."""

    def __init__(
        self,
        node: onnx.NodeProto,
        name: str,
        path: str,
        scope: ConstantScope,
        shapes: dict[str, Shape],
        consumers: dict[str, list[onnx.NodeProto]],
        graph_outputs: set[str],
    ) -> None:
        self.node, self.name, self.path, self.scope = node, name, path, scope
        self.shapes, self.consumers, self.graph_outputs = shapes, consumers, graph_outputs
        self.attrs: dict[str, Any] = {a.name: _attribute(a) for a in node.attribute}

    def extract(self) -> Operator | str:
        method = {
            "MatMul": self._matmul,
            "Gemm": self._gemm,
            "Conv": self._conv,
            "ConvTranspose": self._conv_transpose,
        }[self.node.op_type]
        return method()

    # -- helpers ---------------------------------------------------------------------------
    def _const(self, name: str, stored: bool = False) -> np.ndarray | None:
        """The floating-point constant ``name`` in float64 (``stored``: in its own type,
        not copied), checked finite; None if it is not one."""
        value = self.scope.value(name)
        if value is None:
            return None
        if value.dtype.kind != "f":
            return None
        array = value if stored else value.astype(np.float64)
        if not np.isfinite(array).all():
            raise QmpassInputError(
                f"tensor '{name}' read by node '{self.name}' contains NaN or Inf values."
            )
        return array

    def _sole_consumer(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == op_type and tensor not in self.graph_outputs:
            return users[0]
        return None

    def _dims(self, tensor: str) -> Shape | None:
        return self.shapes.get(tensor)

    def _operator(self, **fields: object) -> Operator:
        for array in (fields["weight"], fields["bias"]):  # (a LazyArray loads read-only)
            if isinstance(array, np.ndarray):
                array.setflags(write=False)
        return Operator(
            name=self.name,
            op_type=self.node.op_type,
            graph=self.path,
            **fields,  # type: ignore[arg-type]
        )

    def _matmul_bias(self, output: str, d_out: int, side: str) -> tuple[np.ndarray | None, str]:
        """A constant ``Add`` that alone consumes the output and is a per-output bias."""
        add = self._sole_consumer(output, "Add")
        if add is None:
            return None, output
        other = add.input[1] if add.input[0] == output else add.input[0]
        value = self._const(other)
        if value is None or value.size != d_out:
            return None, output
        trailing = (
            value.shape[-1] if side == "right" else (value.shape[-2] if value.ndim >= 2 else 0)
        )
        if trailing != d_out:
            return None, output
        return value.reshape(d_out), add.output[0]

    # -- MatMul / Gemm ------------------------------------------------------------------------
    def _matmul(self) -> Operator | str:
        a, b = self.node.input[0], self.node.input[1]
        return self._linear(
            a, b, alpha=1.0, trans_a=False, trans_b=False, bias_input=None, beta=1.0
        )

    def _gemm(self) -> Operator | str:
        a, b = self.node.input[0], self.node.input[1]
        c = self.node.input[2] if len(self.node.input) > 2 else None
        return self._linear(
            a,
            b,
            alpha=float(self.attrs.get("alpha", 1.0)),
            beta=float(self.attrs.get("beta", 1.0)),
            trans_a=bool(self.attrs.get("transA", 0)),
            trans_b=bool(self.attrs.get("transB", 0)),
            bias_input=c or None,
        )

    def _linear(
        self,
        a: str,
        b: str,
        *,
        alpha: float,
        beta: float,
        trans_a: bool,
        trans_b: bool,
        bias_input: str | None,
    ) -> Operator | str:
        a_val, b_val = self._const(a, stored=True), self._const(b, stored=True)
        if a_val is not None and b_val is not None:
            return "both operands are constant (a constant subgraph, not an operator)"
        if a_val is None and b_val is None:
            if self.scope.value(a) is not None or self.scope.value(b) is not None:
                return "constant operand is not a floating-point tensor"
            return "both operands are activations (no weight)"
        side = "right" if b_val is not None else "left"
        weight_in = b if side == "right" else a
        value = b_val if b_val is not None else a_val
        assert value is not None
        if value.ndim != 2:
            return f"constant operand has rank {value.ndim}; only 2-D weights are analysed"
        # W (d_out x d_in) is the value, transposed unless trans_b (right) / if trans_a
        # (left), times alpha: made when used (_held)
        flipped = (not trans_b) if side == "right" else trans_a
        x = a if side == "right" else b
        d_out, d_in = value.shape[::-1] if flipped else value.shape
        notes: list[str] = []
        bias, bias_source, output = None, None, self.node.output[0]
        bias_params = 0
        if bias_input:
            c_val = self._const(bias_input)
            if c_val is None:
                notes.append("bias C is not constant; analysed without it")
            elif c_val.size == 1 or (
                c_val.size == d_out and c_val.shape[-1] == d_out and side == "right"
            ):
                bias = np.broadcast_to(beta * c_val.reshape(-1), (d_out,)).copy()
                bias_source, bias_params = "Gemm C", c_val.size
            else:
                notes.append(
                    f"bias C of shape {c_val.shape} is not per-output; analysed without it"
                )
        elif self.node.op_type == "MatMul":
            bias, output = self._matmul_bias(output, d_out, side)
            if bias is not None:
                bias_source, bias_params = "Add", d_out
        flops = 2 * d_out * d_in * self._vectors(x, side)
        return self._operator(
            input=x,
            output=output,
            weight_name=weight_in,
            weight_source=self.scope.source(weight_in) or "unknown",
            weight=self._held(weight_in, flipped, alpha),
            bias=bias,
            bias_source=bias_source,
            flops=flops,
            params=int(value.size + bias_params),
            weight_side=side,
            notes=tuple(notes),
            transposed_input=trans_a if side == "right" else trans_b,
            unfolded_bias=bool(bias_input) and bias is None,
        )

    def _held(self, name: str, transpose: bool, scale: float) -> LazyArray | HeldArray:
        """The float64 weight of constant ``name``, transposed if ``transpose``, times
        ``scale``, made when it is used (the same arrays, computed the same way), so that
        extraction never holds every weight in float64: an external one is read from its
        file again, one in memory converted from its initializer or folded value."""
        tensor, folder = self.scope.initializer(name), current_folder()
        if tensor is not None and is_external(tensor) and folder is not None:
            return LazyArray(tensor, folder, transpose=transpose, scale=scale)
        if tensor is not None and not is_external(tensor):
            return HeldArray(tensor, transpose, scale)
        value = self.scope.value(name)
        assert value is not None  # (the caller read it)
        return HeldArray(value, transpose, scale)

    def _vectors(self, x: str, side: str) -> int:
        """How many vectors the operator maps for one sample (dynamic dims count as 1)."""
        dims = self._dims(x)
        if not dims:
            return 1
        known = [d if d else 1 for d in dims]
        if self.node.op_type == "Gemm":
            # Gemm inputs are 2-D; the batch of rows is the dynamic M (one sample = one row)
            return 1
        if side == "right":
            return prod(known[:-1]) if len(known) > 1 else 1
        return prod(known[:-2]) * known[-1] if len(known) >= 2 else 1

    # -- Conv / ConvTranspose ---------------------------------------------------------------------
    def _geometry(self, kernel: tuple[int, ...]) -> ConvGeometry:
        rank = len(kernel)
        return ConvGeometry(
            kernel_shape=tuple(self.attrs.get("kernel_shape", kernel)),
            strides=tuple(self.attrs.get("strides", (1,) * rank)),
            pads=tuple(self.attrs.get("pads", (0,) * (2 * rank))),
            dilations=tuple(self.attrs.get("dilations", (1,) * rank)),
            groups=int(self.attrs.get("group", 1)),
            auto_pad=str(self.attrs.get("auto_pad", "NOTSET")),
        )

    def _conv_weights(self) -> tuple[np.ndarray, np.ndarray | None] | str:
        w = self._const(self.node.input[1])
        if w is None:
            return "weight is not a constant (computed at run time)"
        if w.ndim < 3:
            return f"weight has rank {w.ndim}; expected (C, C/groups, *kernel)"
        bias = None
        if len(self.node.input) > 2 and self.node.input[2]:
            bias = self._const(self.node.input[2])
            if bias is None:
                return "bias B is not constant"
        return w, bias

    def _conv(self) -> Operator | str:
        found = self._conv_weights()
        if isinstance(found, str):
            return found
        w, bias = found
        geometry = self._geometry(tuple(w.shape[2:]))
        groups = geometry.groups
        c_out = w.shape[0]
        if c_out % groups:
            return f"{c_out} output channels do not divide into {groups} groups"
        params = int(w.size + (0 if bias is None else bias.size))
        bias_source = "Conv B" if bias is not None else None
        output, bn_name = self.node.output[0], None
        bn = self._sole_consumer(output, "BatchNormalization")
        if bn is not None and len([o for o in bn.output if o]) == 1:
            stats = [s for s in (self._const(name) for name in bn.input[1:5]) if s is not None]
            if len(stats) == 4 and all(s.size == c_out for s in stats):
                gamma, beta, mean, var = (s.reshape(c_out) for s in stats)
                eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
                if not np.all(var + eps > 0):
                    channel = int(np.argmin(var + eps))
                    raise QmpassInputError(
                        f"BatchNormalization '{bn.name or bn.output[0]}' has running variance "
                        f"{var[channel]:g} in channel {channel}, so var + epsilon is not "
                        "positive and the model computes NaN there."
                    )
                w, bias = fold_batchnorm(w, bias, gamma, beta, mean, var, eps)
                bias_source = (
                    "BatchNormalization" if bias_source is None else "Conv B + BatchNormalization"
                )
                output, bn_name = bn.output[0], bn.name or bn.output[0]
                params += 4 * c_out  # the folded node's scale, bias, mean and variance
        blocks = w.reshape(groups, c_out // groups, -1)
        matrix = _block_diagonal(blocks)
        out_dims = self._dims(self.node.output[0])
        pixels = prod(d or 1 for d in out_dims[2:]) if out_dims and len(out_dims) > 2 else 1
        flops = 2 * pixels * w.size
        notes = (
            ()
            if out_dims and len(out_dims) > 2
            else ("output shape unknown: FLOPs per output pixel",)
        )
        return self._operator(
            input=self.node.input[0],
            output=output,
            weight_name=self.node.input[1],
            weight_source=self.scope.source(self.node.input[1]) or "unknown",
            weight=matrix,
            bias=bias,
            bias_source=bias_source,
            flops=flops,
            params=params,
            geometry=geometry,
            folded_batchnorm=bn_name,
            notes=notes,
        )

    def _conv_transpose(self) -> Operator | str:
        found = self._conv_weights()
        if isinstance(found, str):
            return found
        w, bias = found  # (Cin, Cout/groups, *kernel)
        geometry = self._geometry(tuple(w.shape[2:]))
        groups = geometry.groups
        c_in = w.shape[0]
        if c_in % groups:
            return f"{c_in} input channels do not divide into {groups} groups"
        kernel = prod(w.shape[2:])
        # per group: (Cin/g, Cout/g * k) maps an input pixel's channels to output values
        blocks = w.reshape(groups, c_in // groups, -1).transpose(0, 2, 1)
        matrix = _block_diagonal(blocks)
        params = int(w.size + (0 if bias is None else bias.size))
        if bias is not None:
            # row order of the block-diagonal matrix: group, then out channel, then tap
            bias = np.repeat(bias, kernel)
        in_dims = self._dims(self.node.input[0])
        pixels = prod(d or 1 for d in in_dims[2:]) if in_dims and len(in_dims) > 2 else 1
        return self._operator(
            input=self.node.input[0],
            output=self.node.output[0],
            weight_name=self.node.input[1],
            weight_source=self.scope.source(self.node.input[1]) or "unknown",
            weight=matrix,
            bias=bias,
            bias_source="ConvTranspose B" if bias is not None else None,
            flops=2 * pixels * w.size,
            params=params,
            geometry=geometry,
            notes=("bias repeated over kernel taps in the matrix view",)
            if bias is not None
            else (),
        )


def _block_diagonal(blocks: np.ndarray) -> np.ndarray:
    """Block-diagonal matrix of ``blocks`` (groups, rows, cols), contiguous float64."""
    if blocks.shape[0] == 1:
        return np.ascontiguousarray(blocks[0])
    return scipy.linalg.block_diag(*blocks)


def _attribute(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    return value.decode() if isinstance(value, bytes) else value
