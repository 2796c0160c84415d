"""The exit-code contract, class by class (issue 10): 0 done; 2 bad usage or bad input, one
line on stderr, nothing written, no input touched; 1 only for a genuine bug.

Each test builds the input a user could give, runs the command line in process (and a few
in a child process, where onnxruntime's own logging could reach stderr), and asserts the
code, the single line and the files left behind.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conformance import run_cli
from conftest import const, make_model, tensor, trained_matrix
from onnx import TensorProto, helper, numpy_helper

W = trained_matrix(8, 16)


def _matmul(**kw: object) -> onnx.ModelProto:
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", [4, 16])],
                      [tensor("y", [4, 8])], [const("w", W.T)], **kw)  # type: ignore[arg-type]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _refused(argv: list[str], *written: Path) -> str:
    """Run ``argv``; assert exit 2, one line on stderr and none of ``written`` exists."""
    code, err = run_cli([str(a) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qmpass: "), err
    for path in written:
        assert not path.exists(), path
    return lines[0]


def _all_commands_refuse(model: Path, tmp_path: Path, needle: str) -> None:
    out, report, lowered = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "lowered"
    for argv, written in (
        (["analyze", model, "--report", report], [report]),
        (["compress", model, "-o", out, "--report", report], [out, report]),
        (["lower", model, "--target", "cpu", "-o", lowered], [lowered]),
    ):
        assert needle in _refused(argv, *written)


# -- 2, 9: invalid models, the same refusal for all three commands ------------------------
def _invalid_models() -> dict[str, tuple[onnx.ModelProto, str]]:
    cycle = make_model([helper.make_node("Add", ["x", "b"], ["a"]),
                        helper.make_node("Relu", ["a"], ["b"]),
                        helper.make_node("MatMul", ["a", "w"], ["y"])],
                       [tensor("x", [4, 16])], [tensor("y", [4, 8])], [const("w", W.T)],
                       check=False)
    duplicate_output = make_model([helper.make_node("MatMul", ["x", "w"], ["y"]),
                                   helper.make_node("MatMul", ["x", "w"], ["y"])],
                                  [tensor("x", [4, 16])], [tensor("y", [4, 8])],
                                  [const("w", W.T)], check=False)
    undefined = _matmul()
    undefined.graph.node[0].input[0] = "nowhere"
    duplicate_init = _matmul()
    duplicate_init.graph.initializer.append(const("w", W.T))
    unknown_op = _matmul()
    unknown_op.graph.node[0].op_type = "NoSuchOp"
    unknown_domain = _matmul()
    unknown_domain.graph.node[0].domain = "com.example"
    contradicting = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                               [tensor("x", [4, 16])], [tensor("y", [4, 8])],
                               [const("w", trained_matrix(8, 12).T)], check=False)
    negative = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                          [tensor("x", [4, 16])], [tensor("y", [4, 8])],
                          [const("w", W.T)], check=False)
    negative.graph.initializer[0].dims[0] = -16
    ir0 = _matmul()
    ir0.ir_version = 0
    return {
        "cycle": (cycle, "topologically sorted"),
        "duplicate output": (duplicate_output, "single static assignment"),
        "undefined input": (undefined, "nowhere"),
        "duplicate initializer": (duplicate_init, "not unique"),
        "unknown op": (unknown_op, "NoSuchOp"),
        "unknown domain": (unknown_domain, "com.example"),
        "weight contradicts its op": (contradicting, "Incompatible dimensions"),
        "negative dims": (negative, "not a valid ONNX model"),
        "IR version 0": (ir0, "IR version 0"),
    }


@pytest.mark.parametrize("kind", list(_invalid_models()))
def test_an_invalid_model_is_refused_by_every_command(kind: str, tmp_path: Path) -> None:
    model, needle = _invalid_models()[kind]
    _all_commands_refuse(_save(model, tmp_path / "bad.onnx"), tmp_path, needle)


@pytest.mark.parametrize("change", ["ir14", "opset99"])
def test_a_model_onnxruntime_cannot_load_is_refused_in_one_line(change: str,
                                                                tmp_path: Path) -> None:
    """A child process: onnxruntime's own log lines must not reach stderr either."""
    model = _matmul()
    if change == "ir14":
        model.ir_version = 14
    else:
        model.opset_import[0].version = 99
    path = _save(model, tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    for argv in (["compress", path, "-o", out],
                 ["lower", path, "--target", "cpu", "-o", tmp_path / "lowered"]):
        proc = subprocess.run([sys.executable, "-m", "qmpass", *map(str, argv)],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "onnxruntime" in lines[0], proc.stderr
        assert not out.exists() and not (tmp_path / "lowered").exists()


# -- 1: IR < 4, every initializer also a graph input ----------------------------------------
def test_ir3_model_is_written_at_ir4_without_initializer_inputs(tmp_path: Path) -> None:
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                        helper.make_node("MatMul", ["h", "v"], ["y"])],
                       [tensor("x", ["n", 64]), tensor("w", [64, 128]), tensor("v", [128, 10])],
                       [tensor("y", ["n", 10])],
                       [const("w", trained_matrix(128, 64).T),
                        const("v", trained_matrix(10, 128).T)])
    model.ir_version = 3
    path, out = _save(model, tmp_path / "ir3.onnx"), tmp_path / "o.onnx"
    code, err = run_cli(["compress", str(path), "-o", str(out), "--keep", "0.5",
                         "--tolerance", "1"])
    assert code == 0, err
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert written.ir_version == 4
    assert [v.name for v in written.graph.input] == ["x"]  # what a caller feeds
    stored = {t.name for t in written.graph.initializer}
    assert "w" not in stored  # the 128 x 64 weight was factorised


# -- 3, 4: scalar outputs, inputs read only by Sequence ops -----------------------------------
def test_scalar_output_and_sequence_inputs_verify(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0),
             helper.make_node("SequenceEmpty", [], ["seq"]),
             helper.make_node("SequenceInsert", ["seq", "y", "pos"], ["seq2"]),
             helper.make_node("SequenceLength", ["seq2"], ["n"])]
    model = make_model(nodes, [tensor("x", [4, 16]),
                               helper.make_tensor_value_info("pos", TensorProto.INT64, [])],
                       [helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                        helper.make_tensor_value_info("n", TensorProto.INT64, [])],
                       [const("w", W.T)])
    path, out = _save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx"
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((4, 16), np.float32), pos=np.array(0, np.int64))
    code, err = run_cli(["compress", str(path), "-o", str(out), "--calib", str(calib)])
    assert code == 0, err
    assert [v.name for v in onnx.load(str(out)).graph.input] == ["x", "pos"]


# -- 5: Gemm with transA=1 is left alone, not budgeted ------------------------------------------
def test_gemm_transa_with_calibration_is_declined(tmp_path: Path) -> None:
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)],
                       [tensor("x", [64, 8])], [tensor("y", [8, 128])],
                       [const("w", trained_matrix(128, 64).T)])
    path, out, report = (_save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx",
                         tmp_path / "r.json")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    code, err = run_cli(["compress", str(path), "-o", str(out), "--calib", str(calib),
                         "--keep", "0.5", "--report", str(report)])
    assert code == 0, err
    import json

    doc = json.loads(report.read_text())
    assert doc["rewrites"] == []
    assert any("transA" in d["reason"] for d in doc["declined_operators"])


# -- 6, 7: output paths, checked before any work ------------------------------------------------
def test_bad_output_paths_are_refused_before_any_work(tmp_path: Path) -> None:
    model = _save(_matmul(), tmp_path / "m.onnx")
    before = model.read_bytes()
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((4, 16), np.float32))
    cases = {
        "is the input": ["compress", model, "-o", model],
        "is the calibration file": ["compress", model, "-o", calib, "--calib", calib],
        "report is the model output": ["compress", model, "-o", tmp_path / "o.onnx",
                                       "--report", tmp_path / "o.onnx"],
        "parent is a file": ["compress", model, "-o", a_file / "o.onnx"],
        "-o is a folder": ["compress", model, "-o", folder],
        "--report is a folder": ["compress", model, "-o", tmp_path / "o.onnx",
                                 "--report", folder],
        "analyze report is the input": ["analyze", model, "--report", model],
        "html is the json report": ["analyze", model, "--report", tmp_path / "r",
                                    "--html", tmp_path / "r"],
        "lower into a file": ["lower", model, "--target", "cpu", "-o", a_file],
        "lower over the model's folder": ["lower", model, "--target", "cpu", "-o", tmp_path],
    }
    for kind, argv in cases.items():
        line = _refused(argv, tmp_path / "o.onnx", tmp_path / "r")
        assert line, kind
    assert model.read_bytes() == before and a_file.read_text() == "x"
    assert not any(folder.iterdir())


def test_an_unwritable_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """(Run as root, every folder is writable: os.access is what the check asks.)"""
    import os

    model = _save(_matmul(), tmp_path / "m.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    assert "not writable" in _refused(["compress", model, "-o", locked / "o.onnx"])


# -- 8: numeric and shape edge cases ------------------------------------------------------------
def test_batchnorm_with_negative_variance_is_bad_input(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3))
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
        [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 6, 6])],
        [const("w", w), const("g", np.ones(8)), const("b", np.zeros(8)),
         const("m", np.zeros(8)), const("v", -np.ones(8))])
    path = _save(model, tmp_path / "bn.onnx")
    for argv in (["analyze", path], ["compress", path, "-o", tmp_path / "o.onnx"]):
        assert "running variance" in _refused(argv, tmp_path / "o.onnx")


def test_huge_declared_input_without_calibration_is_refused(tmp_path: Path) -> None:
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", [2**36, 16])], [tensor("y", [2**36, 8])],
                       [const("w", W.T)])
    path = _save(model, tmp_path / "m.onnx")
    assert "--calib" in _refused(["compress", path, "-o", tmp_path / "o.onnx"],
                                 tmp_path / "o.onnx")


def test_scalar_bool_input_and_huge_calibration_values_compress(tmp_path: Path) -> None:
    nodes = [helper.make_node("Cast", ["flag"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "f"], ["xf"]),
             helper.make_node("MatMul", ["xf", "w"], ["y"])]
    model = make_model(nodes, [tensor("x", [4, 16]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                       [tensor("y", [4, 8])], [const("w", W.T)])
    path, out = _save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx"
    assert run_cli(["compress", str(path), "-o", str(out)])[0] == 0
    huge = tmp_path / "huge.npz"
    np.savez(huge, x=np.full((4, 16), 1e38, np.float32), flag=np.array(True))
    code, err = run_cli(["compress", str(path), "-o", str(out), "--calib", str(huge),
                         "--keep", "0.5"])
    assert code in (0, 2) and code != 1, err


# -- 10: lower -------------------------------------------------------------------------------
def test_lower_declines_what_it_cannot_check(tmp_path: Path) -> None:
    half = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 8])],
                      [numpy_helper.from_array(W.T.astype(np.float16), "w")])
    empty = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", [4, 0])], [tensor("y", [4, 8])],
                       [const("w", np.zeros((0, 8)))])
    for model, needle in ((half, "FLOAT16"), (empty, "empty")):
        path, lowered = _save(model, tmp_path / "m.onnx"), tmp_path / "lowered"
        assert needle in _refused(["lower", path, "--target", "cpu", "-o", lowered], lowered)


def test_lower_runs_int8_weights_behind_dequantize_linear(tmp_path: Path) -> None:
    """The reference is the graph's own arithmetic: onnxruntime's QDQ fusion (which
    quantizes the activation) is off when tensors are captured."""
    q = np.clip(np.round(trained_matrix(16, 32).T / 0.01), -127, 127).astype(np.int8)
    model = make_model(
        [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", [4, 32])], [tensor("y", [4, 16])],
        [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(np.array(0.01, np.float32),
                                                                   "s"),
         numpy_helper.from_array(np.array(0, np.int8), "z")])
    path = _save(model, tmp_path / "dq.onnx")
    code, err = run_cli(["lower", str(path), "--target", "cpu", "-o", str(tmp_path / "l")])
    assert code == 0, err


# -- 11: dynamic dimensions written as -1 ------------------------------------------------------
def test_minus_one_dims_are_dynamic(tmp_path: Path) -> None:
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", [-1, 16])], [tensor("y", [-1, 8])], [const("w", W.T)])
    path, out, calib = (_save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx",
                        tmp_path / "c.npz")
    np.savez(calib, x=np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    for argv in (["compress", path, "-o", out, "--calib", calib],
                 ["compress", path, "-o", out]):
        code, err = run_cli([str(a) for a in argv])
        assert code == 0, err
