"""Shared by the hw_targets tests: onnxruntime references and the error bound of fp16 inputs.

The references run one-node ONNX models in onnxruntime (the operator as ONNX defines it);
the tolerance is not a loose default but the rounding bound of what the kernels do:
inputs rounded to the target's input dtype, products accumulated in fp32.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from hw_targets.lower import gemm_error_bound


def _run(graph: onnx.GraphProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def ort_matmul(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``a @ b (+ bias)`` by onnxruntime (MatMul, then Add when there is a bias)."""
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y" if bias is None else "p"])]
    inits = [numpy_helper.from_array(b.astype(np.float32), "b")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["p", "bias"], ["y"]))
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "bias"))
    graph = helper.make_graph(
        nodes,
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [a.shape[0], b.shape[1]])],
        inits,
    )
    return _run(graph, {"a": a.astype(np.float32)})


def ort_conv(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> np.ndarray:
    """An ONNX Conv of NCHW ``x`` by onnxruntime (``pads`` as ONNX: top, left, bottom, right)."""
    inputs = ["x", "w"] + ([] if bias is None else ["bias"])
    node = helper.make_node(
        "Conv", inputs, ["y"], strides=list(strides), pads=list(pads),
        dilations=list(dilations), group=groups, kernel_shape=list(w.shape[2:]),
    )
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "bias"))
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return _run(inferred.graph, {"x": x.astype(np.float32)})


def gemm_tolerance(
    a: np.ndarray, b: np.ndarray, bias: np.ndarray | None, dtype: str
) -> np.ndarray:
    """Bound on ``|kernel - onnxruntime|`` for ``a @ b + bias`` (2-D ``a``, ``b``): the
    rounding bound of :func:`hw_targets.lower.gemm_error_bound`."""
    return gemm_error_bound(a, b, dtype, bias) + 1e-30
