"""A representative subset of the conformance suite over ONNX's own backend test data
(``tests/conformance.py``; ``bench/conformance.py`` runs all of it and prints the table).

Each case goes through ``analyze``, a near-lossless and a lossy ``compress`` (and ``lower``
for the marked ones); no command may crash, every written model must pass the checker,
keep its interface and load in onnxruntime, and near-lossless outputs must match the
expected outputs of the backend tests.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conformance import failures, file_cases, node_cases, run_case

#: one or two of each kind that the full run covers: IR 3 weights-as-inputs (the
#: pytorch-converted ones), BatchNorm after Conv, grouped and depthwise convs, transposed
#: Gemm, Sequence ops, models onnxruntime cannot run, a light-zoo network
FILE_CASES = {
    "test_Conv2d": True,
    "test_Conv2d_depthwise_with_multiplier": False,
    "test_Conv2d_groups": False,
    "test_BatchNorm2d_eval": False,
    "test_ConvTranspose2d": False,
    "test_Linear": True,  # float64 Gemm: onnxruntime has no kernel, refused
    "test_Linear_no_bias": False,  # its rewrite (a float64 Add at opset 6) cannot run: rolled back
    "test_Embedding": False,
    "test_operator_addmm": False,
    "test_operator_conv": False,
    "test_AvgPool1d": False,  # onnxruntime has no kernel for it: refused
    "test_sequence_model1": False,
    "test_sequence_model6": False,
    "test_gradient_of_add": False,
}
NODE_CASES = {
    "test_gemm_all_attributes_const": False,
    "test_gemm_transposeA_const": False,
    "test_gemm_default_matrix_bias_const": True,  # a C that is not per-output: not lowered
    "test_matmul_4d_const": False,
    "test_conv_with_strides_and_asymmetric_padding_const": False,
    "test_convtranspose_group_2_const": False,
    "test_resize_downsample_scales_cubic_align_corners": False,
    "test_if_opt": False,  # optional types onnx-graphsurgeon cannot export: left as it is
}


@pytest.fixture(scope="module")
def cases() -> dict[str, object]:
    wanted = set(FILE_CASES) | set(NODE_CASES) | {"light_squeezenet"}
    return {c.name: c for c in (*file_cases(), *node_cases()) if c.name in wanted}


@pytest.mark.parametrize("name", [*FILE_CASES, *NODE_CASES])
def test_conformance_case(name: str, cases: dict, tmp_path: Path) -> None:
    outcomes = run_case(cases[name], tmp_path, lower={**FILE_CASES, **NODE_CASES}[name])
    assert failures(outcomes) == []
    assert {o.command for o in outcomes} >= {"analyze", "compress-near", "compress-keep"}


def test_light_zoo_model_at_ir3_is_rewritten_not_only_refused(cases: dict,
                                                               tmp_path: Path) -> None:
    """light_squeezenet is IR 3 (every weight is a graph input too): it passes the suite's
    checks and the lossy run writes IR 4 with factorised convolutions."""
    assert failures(run_case(cases["light_squeezenet"], tmp_path)) == []
    written = onnx.load(str(tmp_path / "light_squeezenet" / "lossy.onnx"))
    assert written.ir_version == 4
    assert any("lowrank" in n.name for n in written.graph.node)
