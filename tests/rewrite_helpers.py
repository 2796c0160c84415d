"""Helpers shared by the rewrite tests (low-rank MatMul/Conv, shared basis): truncated SVD
factors and the steps that carry them, and checks on the rewritten model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from qmpass.extract import Operator
from qmpass.plan.plan import Cost, Step


def truncated(w: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Rank-q SVD factors ``first = S_q V_q^T``, ``second = U_q`` and sigma_{q+1}."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    sigma_next = float(s[q]) if q < len(s) else 0.0
    return s[:q, None] * vt[:q], np.ascontiguousarray(u[:, :q]), sigma_next


def lowrank_step(op: Operator, q: int, sigma_next: float = 0.0) -> Step:
    d_out, d_in = op.shape
    return Step(
        kind="lowrank",
        operators=(op.name,),
        before=Cost(op.params, op.flops),
        after=Cost(q * (d_in + d_out), op.flops * q * (d_in + d_out) // (d_in * d_out)),
        predicted_error=sigma_next,
        rank=q,
        certificate={"sigma_next": sigma_next},
    )


def factors_for(op: Operator, q: int) -> tuple[dict[str, np.ndarray], float]:
    first, second, sigma_next = truncated(op.weight, q)
    tensors = {"first": first, "second": second}
    if op.bias is not None:
        tensors["bias"] = np.array(op.bias)
    return tensors, sigma_next


def op_types(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def initializer_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    return sorted(tuple(init.dims) for init in model.graph.initializer)


def assert_envelope_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert list(after.graph.input) == list(before.graph.input)
    assert list(after.graph.output) == list(before.graph.output)
    assert after.ir_version == before.ir_version
    assert list(after.opset_import) == list(before.opset_import)
    onnx.checker.check_model(after, full_check=True)
