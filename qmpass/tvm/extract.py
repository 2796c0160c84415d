"""Relax function -> :class:`~qmpass.extract.Operator` records (read-only).

The same records as the ONNX extraction, so the spectra, the QM-FRG and the planner are
shared. A Relax module imported by ``tvm.relax.frontend.onnx.from_onnx`` writes the
weight operators of an ONNX graph like this (``W`` stored as ONNX stores it):

==========================  ======================================================
ONNX                        Relax bindings (one site)
==========================  ======================================================
``MatMul(x, W)`` + ``Add``  ``y = R.matmul(x, W)``; ``R.add(y, b)`` or ``R.add(b, y)``
``Gemm(x, W, C, transB)``   ``t = R.permute_dims(W, [1, 0])``; ``R.matmul(x, t)``;
                            ``R.add(y, C)``
``Conv(x, W, B)``           ``R.nn.conv2d(x, W)``; ``r = R.reshape(B, [1, C, 1, 1])``;
                            ``R.add(y, r)``
``Conv`` + ``BatchNorm``    ``R.nn.conv2d``; ``R.nn.batch_norm(...)``; ``[0]`` of it
==========================  ======================================================

``W`` may be a constant (the default import) or a function parameter
(``keep_params_in_input=True``) whose value is in the function's ``"params"``
attribute or given by the caller (``relax.frontend.detach_params``). The matrix view is
the ONNX one: ``d_out x d_in``, a convolution as ``Cout x Cin*kh*kw`` (block-diagonal
over groups), a batch norm folded in (``scale = gamma / sqrt(var + eps)``) in float64 as
the ONNX extraction does, so both give the same numbers for the same model. A bias or
batch norm is part of a site only when it alone reads the call's output, as in ONNX.

Operators are named after the variable the call is bound to (``lv4``; ``#k`` on
repeats), their ``input`` after the activation variable; ``graph`` is the function name
when it is ``main`` (what the planner factorises), else ``main/<name>``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any, Literal

import numpy as np
import scipy.linalg
import tvm
from tvm import relax

from qmpass.algebra import fold_batchnorm
from qmpass.extract import ConvGeometry, Extraction, Operator, Skipped
from qmpass.extract.extract import fusion_groups

__all__ = ["RelaxExtraction", "Site", "extract_relax"]

SiteKind = Literal["matmul", "conv2d"]


@dataclass(frozen=True, eq=False)
class Site:
    """Where an operator lives in the Relax function.

    ``call`` is the variable bound to the ``matmul``/``conv2d`` call, ``input`` the
    activation it reads, ``output`` the variable that carries ``W x + b`` (the bias add
    or the batch norm's item 0, else ``call``). ``internal`` are all the variables bound
    inside the site (weight transpose, bias reshape, the call, bias add, batch norm and
    its items): a rewrite drops them all, which is sound because nothing outside the
    site reads any of them but ``output``. ``dtype`` is the weight's element type,
    ``position`` the index of the call's binding in the function.
    """

    operator: Operator
    kind: SiteKind
    call: Any  # relax.Var
    input: Any  # relax.Expr
    output: Any  # relax.Var
    internal: tuple[Any, ...]
    dtype: str
    position: int
    weight_param: str | None = None


@dataclass(frozen=True)
class RelaxExtraction:
    """The weight operators of one Relax function, with their sites (same order)."""

    function: str
    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...]

    @property
    def operators(self) -> tuple[Operator, ...]:
        return tuple(site.operator for site in self.sites)

    def extraction(self) -> Extraction:
        """The records the planner reads (:func:`qmpass.plan.planner.make_plan`)."""
        ops = list(self.operators)
        return Extraction(
            operators=tuple(ops),
            skipped=self.skipped,
            unsupported=(),
            fusion_groups=fusion_groups(ops),
            opset=0,
            ir_version=0,
        )


def extract_relax(
    mod: Any,
    function: str = "main",
    params: Mapping[str, Any] | None = None,
) -> RelaxExtraction:
    """The weight operators of ``mod[function]`` (an ``IRModule``; not modified).

    ``params`` maps parameter names to values (numpy arrays or ``tvm.runtime.Tensor``)
    for weights that are function parameters; without it the function's ``"params"``
    attribute (what ``from_onnx(keep_params_in_input=True)`` writes) is read.
    """
    if function not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise KeyError(f"the module has no function '{function}'")
    func = mod[function]
    if not isinstance(func, relax.Function):
        raise TypeError(f"'{function}' is not a Relax function")
    return _Walker(func, function, _param_values(func, params)).run()


def _param_values(func: Any, given: Mapping[str, Any] | None) -> dict[Any, np.ndarray]:
    """Weight values of the function's parameters, keyed by parameter variable."""
    values: dict[Any, np.ndarray] = {}
    attrs = func.attrs if func.attrs is not None else {}
    if given is None and "params" in attrs and "num_input" in attrs:
        stored = list(attrs["params"])
        weights = list(func.params)[int(attrs["num_input"]):]
        for var, value in zip(weights, stored, strict=False):
            values[var] = value.numpy()
    elif given is not None:
        for var in func.params:
            if var.name in given:
                value = given[var.name]
                values[var] = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return values


def static_dims(expr: Any) -> tuple[int | None, ...] | None:
    """Static shape of a tensor expression (None for symbolic dims), if its rank is known."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    values = getattr(ty.shape, "values", None)
    if values is None:
        return None
    return tuple(int(v) if isinstance(v, tvm.tirx.IntImm) else None for v in values)


def _op_name(call: Any) -> str:
    return str(call.op.name) if isinstance(call, relax.Call) and hasattr(call.op, "name") else ""


class _Walker:
    def __init__(self, func: Any, function: str, params: dict[Any, np.ndarray]) -> None:
        self.func = func
        self.function = function
        self.graph = "main" if function == "main" else f"main/{function}"
        self.params = params
        self.value: dict[Any, Any] = {}
        self.order: list[Any] = []
        self.uses: Counter[Any] = Counter()
        self.readers: dict[Any, list[Any]] = defaultdict(list)
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(binding, relax.VarBinding):
                    self.value[binding.var] = value
                self.order.append(binding.var)
                for var in relax.analysis.free_vars(value):
                    self.uses[var] += 1
                    self.readers[var].append(binding.var)
        for var in relax.analysis.free_vars(func.body.body):
            self.uses[var] += 1
        self.names: dict[Any, str] = {}
        self.taken: set[str] = set()
        self.sites: list[Site] = []
        self.skipped: list[Skipped] = []

    # -- helpers ---------------------------------------------------------------------------
    def name(self, var: Any) -> str:
        if var not in self.names:
            base = str(var.name) or "v"
            candidate, k = base, 1
            while candidate in self.taken:
                k += 1
                candidate = f"{base}#{k}"
            self.taken.add(candidate)
            self.names[var] = candidate
        return self.names[var]

    def const(self, expr: Any) -> np.ndarray | None:
        """The value of a constant or of a parameter with a known value."""
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
            return np.asarray(expr.value.numpy())
        if isinstance(expr, relax.Var) and expr in self.params:
            return self.params[expr]
        return None

    def sole_reader(self, var: Any, op: str) -> Any | None:
        """The variable bound to the one ``op`` call that alone reads ``var``, if any."""
        if self.uses[var] != 1 or len(self.readers[var]) != 1:
            return None
        reader = self.readers[var][0]
        return reader if _op_name(self.value.get(reader)) == op else None

    def source(self, expr: Any) -> tuple[str, str | None]:
        if isinstance(expr, relax.Var):
            return "parameter", str(expr.name)
        return "constant", None

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> RelaxExtraction:
        self.position = {var: i for i, var in enumerate(self.order)}
        for var in self.order:
            call = self.value.get(var)
            op = _op_name(call)
            if op == "relax.matmul":
                site = self.matmul(var, call)
            elif op == "relax.nn.conv2d":
                site = self.conv2d(var, call)
            else:
                continue
            if isinstance(site, Site):
                self.sites.append(site)
            elif site is not None:
                self.skipped.append(Skipped(self.name(var), op, self.graph, site))
        return RelaxExtraction(self.function, tuple(self.sites), tuple(self.skipped))

    def matmul(self, var: Any, call: Any) -> Site | str | None:
        x, w_expr = call.args[0], call.args[1]
        internal = [var]
        stored = self.const(w_expr)
        weight_expr = w_expr
        if stored is not None:
            if stored.ndim != 2:
                return f"constant operand has rank {stored.ndim}; only 2-D weights"
            w = stored.T  # x @ W_stored: the matrix view is its transpose
        else:
            inner: Any = self.value.get(w_expr) if isinstance(w_expr, relax.Var) else None
            if _op_name(inner) != "relax.permute_dims" or self.uses[w_expr] != 1:
                return None  # two activations multiplied (attention): no weight
            stored = self.const(inner.args[0])
            axes = inner.attrs.axes
            if stored is None or stored.ndim != 2 or (
                    axes is not None and [int(a) for a in axes] != [1, 0]):
                return None
            w = stored  # x @ W_stored^T (Gemm transB): the matrix view is W_stored
            internal.insert(0, w_expr)
            weight_expr = inner.args[0]
        if self.const(x) is not None:
            return "weight on the left side is not factorised"
        w = np.ascontiguousarray(w, dtype=np.float64)
        d_out, d_in = w.shape
        output, bias = var, None
        add = self.sole_reader(var, "relax.add")
        if add is not None:
            a, b = self.value[add].args
            other = b if a.same_as(var) else a
            value = self.const(other)
            if value is not None and value.size == d_out and value.shape[-1] == d_out:
                bias = np.asarray(value, dtype=np.float64).reshape(d_out)
                output = add
                internal.append(add)
        x_dims = static_dims(x)
        vectors = prod(d or 1 for d in x_dims[:-1]) if x_dims and len(x_dims) > 1 else 1
        kind, param = self.source(weight_expr)
        op = self.operator(
            var, x, output, "MatMul", w, bias, param, kind,
            flops=2 * d_out * d_in * vectors,
            params=int(w.size + (0 if bias is None else bias.size)),
            bias_source=None if bias is None else "add",
        )
        return Site(op, "matmul", var, x, output, tuple(internal), _dtype(weight_expr),
                    self.position[var], param)

    def conv2d(self, var: Any, call: Any) -> Site | str | None:
        attrs = call.attrs
        if (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NCHW", "OIHW") or \
                str(attrs.out_layout) not in ("NCHW", ""):
            return f"layout {attrs.data_layout}/{attrs.kernel_layout} is not NCHW/OIHW"
        x, w_expr = call.args[0], call.args[1]
        stored = self.const(w_expr)
        if stored is None or stored.ndim != 4:
            return "weight is not a constant 4-D tensor"
        groups = int(attrs.groups)
        w = np.asarray(stored, dtype=np.float64)
        c_out = w.shape[0]
        internal, output = [var], var
        bias: np.ndarray | None = None
        bias_params, bias_source = 0, None
        add = self.sole_reader(var, "relax.add")
        if add is not None:
            found = self.conv_bias(var, add, c_out)
            if found is not None:
                bias, extra = found
                internal += [*extra, add]
                output = add
                bias_params, bias_source = c_out, "add"
        params = int(w.size) + bias_params
        bn = self.sole_reader(output, "relax.nn.batch_norm")
        folded = self.batch_norm(bn, c_out) if bn is not None else None
        if folded is not None:
            stats, item, items = folded
            w, bias = fold_batchnorm(w, bias, *stats)
            internal += [bn, *items]
            output = item
            params += 4 * c_out
            bias_source = "batch_norm" if bias_source is None else "add + batch_norm"
        blocks = w.reshape(groups, c_out // groups, -1)
        matrix = blocks[0] if groups == 1 else scipy.linalg.block_diag(*blocks)
        out_dims = static_dims(var)
        pixels = prod(d or 1 for d in out_dims[2:]) if out_dims and len(out_dims) > 2 else 1
        geometry = ConvGeometry(
            kernel_shape=tuple(int(k) for k in w.shape[2:]),
            strides=tuple(int(s) for s in attrs.strides),
            pads=tuple(int(p) for p in attrs.padding),
            dilations=tuple(int(d) for d in attrs.dilation),
            groups=groups,
        )
        kind, param = self.source(w_expr)
        op = self.operator(
            var, x, output, "Conv", np.ascontiguousarray(matrix), bias, param, kind,
            flops=2 * pixels * int(w.size), params=params, bias_source=bias_source,
            geometry=geometry,
        )
        return Site(op, "conv2d", var, x, output, tuple(internal), _dtype(w_expr),
                    self.position[var], param)

    def conv_bias(self, var: Any, add: Any, c_out: int) -> tuple[np.ndarray, list[Any]] | None:
        """A per-channel bias added to the conv output: a constant of shape
        ``(1, C, 1, 1)``/``(C, 1, 1)``, or a reshape of a ``(C,)`` constant read only here."""
        a, b = self.value[add].args
        other = b if a.same_as(var) else a
        extra: list[Any] = []
        value = self.const(other)
        if value is None and isinstance(other, relax.Var) and self.uses[other] == 1 and \
                _op_name(self.value.get(other)) == "relax.reshape":
            value = self.const(self.value[other].args[0])
            extra = [other]
            target = static_dims(other)
            if value is None or target is None or len(target) != 4:
                return None
            value = value.reshape(tuple(d or 1 for d in target))
        if value is None or value.size != c_out or value.ndim not in (3, 4) or \
                value.shape[-3] != c_out:
            return None
        return np.asarray(value, dtype=np.float64).reshape(c_out), extra

    def batch_norm(
        self, bn: Any, c_out: int
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], Any, list[Any]] | None:
        """Inference batch norm over the channels: its ``(gamma, beta, mean, var, eps)``
        (for :func:`~qmpass.algebra.fold_batchnorm`), the variable of item 0 and the
        variables of all its items (items 1, 2 must be unused)."""
        call = self.value[bn]
        attrs = call.attrs
        if int(attrs.axis) != 1 or bool(getattr(attrs, "training", False)):
            return None
        stats = [self.const(arg) for arg in call.args[1:5]]
        if any(s is None or s.size != c_out for s in stats):
            return None
        gamma, beta, mean, var = (np.asarray(s, dtype=np.float64).reshape(c_out)
                                  for s in stats)
        if not bool(attrs.scale):
            gamma = np.ones(c_out)
        if not bool(attrs.center):
            beta = np.zeros(c_out)
        item, items = None, []
        for reader in self.readers[bn]:
            value = self.value.get(reader)
            if not isinstance(value, relax.TupleGetItem):
                return None
            if int(value.index) == 0:
                item = reader
            elif self.uses[reader]:
                return None  # the running statistics are read: not an inference batch norm
            items.append(reader)
        if item is None or self.uses[bn] != len(items):
            return None
        return (gamma, beta, mean, var, float(attrs.epsilon)), item, items

    def operator(
        self, var: Any, x: Any, output: Any, op_type: str, w: np.ndarray,
        bias: np.ndarray | None, param: str | None, kind: str, *, flops: int, params: int,
        bias_source: str | None, geometry: ConvGeometry | None = None,
    ) -> Operator:
        for array in (w, bias):
            if array is not None:
                array.setflags(write=False)
        return Operator(
            name=self.name(var),
            op_type=op_type,
            graph=self.graph,
            input=self.name(x) if isinstance(x, relax.Var) else "<expr>",
            output=self.name(output),
            weight_name=param or f"{self.name(var)}/weight",
            weight_source=kind,
            weight=w,
            bias=bias,
            bias_source=bias_source,
            flops=int(flops),
            params=params,
            geometry=geometry,
        )


def _dtype(expr: Any) -> str:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else "float32"
