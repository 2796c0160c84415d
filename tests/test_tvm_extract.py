"""extract_relax: Relax functions imported from ONNX give the ONNX path's Operator records.

The reference is the ONNX extraction of the same file: every operator must come out with
the same matrix view (BatchNorm folded in float64), bias, geometry, FLOPs and parameter
count, for weights held as constants and as bound parameters
(``keep_params_in_input=True``, values in the function's ``"params"`` attribute or given
by the caller after ``detach_params``).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import tvm
from conftest import ROOT, fixture_path, trained_matrix
from tvm import relax
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.onnx import from_onnx

from qmpass.extract import Operator, extract_operators
from qmpass.rewrite.base import name_nodes
from qmpass.tvm import extract_relax, match_operators

FIXTURES = ["mlp_digits", "resnet_digits", "resnet_digits_bn", "transformer_digits"]


def _onnx_ops(name: str) -> tuple[onnx.ModelProto, tuple[Operator, ...]]:
    model = name_nodes(onnx.load(str(fixture_path(name))))
    return model, extract_operators(model).operators


def _assert_same(expected: Operator, got: Operator) -> None:
    assert got.op_type == ("Conv" if expected.op_type == "Conv" else "MatMul")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.weight, expected.weight, rtol=0, atol=1e-12)
    assert (got.bias is None) == (expected.bias is None)
    if expected.bias is not None:
        np.testing.assert_allclose(got.bias, expected.bias, rtol=0, atol=1e-12)
    assert got.geometry == expected.geometry
    assert (got.flops, got.params) == (expected.flops, expected.params)


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("as_params", [False, True], ids=["constants", "params"])
def test_fixture_operators_equal_the_onnx_extraction(name: str, as_params: bool) -> None:
    model, expected = _onnx_ops(name)
    mod = from_onnx(model, keep_params_in_input=as_params)
    found = extract_relax(mod)
    assert len(found.sites) == len(expected)
    assert not found.skipped
    for want, site in zip(expected, found.sites, strict=True):
        _assert_same(want, site.operator)
        if as_params:  # the importer keeps initializer names, less an "onnx::" prefix
            assert site.weight_param == want.weight_name.split("::")[-1]
        else:
            assert site.weight_param is None
    # the planner sees the same fusion groups (Q/K/V of both transformer layers)
    matched = match_operators(expected, found.sites)
    assert len(matched) == len(expected)
    onnx_groups = extract_operators(model).fusion_groups
    relax_groups = found.extraction().fusion_groups
    assert [tuple(matched[n].operator.name for n in g) for g in onnx_groups] == list(relax_groups)
    assert len(relax_groups) == (2 if name == "transformer_digits" else 0)


def test_detached_params_given_by_the_caller() -> None:
    model, expected = _onnx_ops("resnet_digits_bn")
    mod, params = detach_params(from_onnx(model, keep_params_in_input=True))
    func = mod["main"]
    names = [p.name for p in func.params][int(func.attrs["num_input"]):]
    values = dict(zip(names, params["main"], strict=True))
    assert not extract_relax(mod).sites  # no values: the weights are plain inputs
    found = extract_relax(mod, params=values)
    for want, site in zip(expected, found.sites, strict=True):
        _assert_same(want, site.operator)


def test_bound_params_are_constants_again() -> None:
    model, expected = _onnx_ops("mlp_digits")
    mod, params = detach_params(from_onnx(model, keep_params_in_input=True))
    func = mod["main"]
    names = [p.name for p in func.params][int(func.attrs["num_input"]):]
    bound = relax.transform.BindParams("main", dict(zip(names, params["main"], strict=True)))(mod)
    found = extract_relax(bound)
    assert [s.weight_param for s in found.sites] == [None] * 3
    for want, site in zip(expected, found.sites, strict=True):
        _assert_same(want, site.operator)


def _module(build) -> tvm.IRModule:  # type: ignore[no-untyped-def]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = build(bb, x)
        bb.emit_func_output(out)
    return bb.get()


def test_what_is_not_an_operator_and_what_a_site_holds() -> None:
    w = trained_matrix(32, 32)  # d_out x d_in
    w2 = trained_matrix(16, 32)

    def build(bb, x):  # type: ignore[no-untyped-def]
        y = bb.emit(relax.op.matmul(x, relax.const(w.T)))  # no bias: y is read twice
        z = bb.emit(relax.op.add(y, relax.const(np.ones(32, "float32"))))
        scores = bb.emit(relax.op.matmul(z, relax.op.permute_dims(y)))  # two activations
        gemm = bb.emit(relax.op.permute_dims(relax.const(w2), [1, 0]))
        h = bb.emit(relax.op.matmul(x, gemm))
        return bb.emit_output(relax.op.add(relax.const(np.zeros(16, "float32")), h)), scores

    found = extract_relax(_module(lambda bb, x: build(bb, x)[0]))
    ops = [s.operator for s in found.sites]
    assert len(ops) == 2  # the attention-style product has no weight
    first, second = found.sites
    np.testing.assert_array_equal(first.operator.weight, w)
    assert first.operator.bias is None  # the add reads y, but y is also read elsewhere
    assert first.output.same_as(first.call)
    np.testing.assert_array_equal(second.operator.weight, w2)
    np.testing.assert_array_equal(second.operator.bias, np.zeros(16))
    assert len(second.internal) == 3  # transpose, matmul, bias add (bias on the left)
    assert second.operator.flops == 2 * 16 * 32 * 4


def test_batch_norm_with_read_statistics_is_not_folded() -> None:
    conv_w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype("float32")
    stats = [relax.const(np.full(8, v, "float32")) for v in (1.0, 0.0, 0.0, 1.0)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(conv_w), padding=[1, 1, 1, 1]))
            bn = bb.emit(relax.op.nn.batch_norm(y, *stats, axis=1))
            out = bb.emit_output(relax.TupleGetItem(bn, 0))
            mean = bb.emit_output(relax.TupleGetItem(bn, 1))
        bb.emit_func_output(relax.Tuple([out, mean]))
    (site,) = extract_relax(bb.get()).sites
    assert site.operator.bias is None and site.output.same_as(site.call)
    np.testing.assert_array_equal(site.operator.weight, conv_w.reshape(8, -1))
    assert site.operator.geometry is not None and site.operator.geometry.pads == (1, 1, 1, 1)


def test_importing_qmpass_does_not_import_tvm() -> None:
    code = "import sys, qmpass, qmpass.compress; print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
