"""``qmpass lower``: every fixture on every target gives kernels that compile, run in the
simulation, match onnxruntime within the rounding bound of the target's arithmetic, and
cost what the cost model predicts; the bundle builds and runs without Python."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import fixture_path, make_model, tensor
from onnx import TensorProto, helper, numpy_helper

import models
from hw_targets import TARGET_NAMES
from qmpass.cli import main
from qmpass.errors import QmpassInputError
from qmpass.lower import LowerConfig, lower


def _calib(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_path(name).with_name(f"{name}_calib.npz")) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("target", TARGET_NAMES)
@pytest.mark.parametrize("name", list(models.FIXTURES))
def test_every_fixture_lowers_and_matches_onnxruntime(
    name: str, target: str, tmp_path: Path
) -> None:
    out = tmp_path / "lowered"
    report = lower(fixture_path(name), LowerConfig(target, _calib(name)), out)
    doc = json.loads((out / "lowering.json").read_text())
    assert doc == json.loads(json.dumps(report.to_dict()))
    model = onnx.load(str(fixture_path(name)))
    weight_ops = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
                  and any(i.name in n.input for i in model.graph.initializer)]
    assert len(doc["operators"]) == len(weight_ops)
    # only attention's activation x activation products stay on the host
    assert all("no weight" in r["reason"] for r in doc["not_lowered"])
    for op in doc["operators"]:
        assert op["within_bound"], op["operator"]
        assert op["max_abs_error"] <= op["error_bound"]
        assert op["simulated_cycles"] == op["predicted_cycles"]
        for kernel in op["kernels"]:
            assert kernel["simulated_pipes"] == kernel["predicted"]["pipes"]
            assert (out / "kernels" / f"{kernel['name']}.cc").is_file()
    assert doc["cycles"]["predicted"] == doc["cycles"]["simulated"] > 0
    # a BatchNormalization after a conv is folded into its kernel, not left to the host
    assert "BatchNormalization" not in doc["host_ops"]
    assert (out / "build.sh").stat().st_mode & 0o100


def test_the_bundle_builds_and_runs_without_python(tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    lower(fixture_path("mlp_digits"), LowerConfig("cpu"), out)
    done = subprocess.run([str(out / "build.sh")], capture_output=True, text=True, check=True)
    counters = [json.loads(line) for line in done.stdout.splitlines()]
    doc = json.loads((out / "lowering.json").read_text())
    expected = [k["simulated_cycles"] for op in doc["operators"] for k in op["kernels"]]
    assert [c["cycles"] for c in counters] == expected
    assert len(list((out / "data").glob("*_c.out"))) == len(doc["operators"])


def test_cli_prints_the_table_and_writes_the_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["lower", str(fixture_path("mlp_digits")), "--target", "mlu", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "within the rounding bound: True" in printed
    assert (out / "lowering.json").is_file()


def test_unknown_target_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["lower", str(fixture_path("mlp_digits")), "--target", "tpu",
              "-o", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tpu'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_model_without_lowerable_operators_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor("x", [1, 4])],
        [tensor("y", [1, 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    assert main(["lower", str(path), "--target", "cpu", "-o", str(tmp_path / "out")]) == 2
    assert "has no operator that qmpass can lower" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unrelated_output_folder_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = main(["lower", str(fixture_path("mlp_digits")), "--target", "cpu", "-o", str(out)])
    assert code == 2
    assert "is not an earlier qmpass lowering" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no staging folder left


def test_unsupported_operators_are_listed_not_lowered(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3],
                                rng.standard_normal(36).astype(np.float32).ravel().tolist())
    conv1d = helper.make_node("Conv", ["x", "w"], ["h"], kernel_shape=[3])
    gemm_w = helper.make_tensor("g", TensorProto.FLOAT, [8, 5],
                                rng.standard_normal(40).astype(np.float32).ravel().tolist())
    flat = helper.make_node("Flatten", ["h"], ["f"])
    gemm = helper.make_node("Gemm", ["f", "g"], ["y"])
    model = make_model([conv1d, flat, gemm], [tensor("x", [1, 3, 4])], [tensor("y", [1, 5])],
                       initializers=[weight, gemm_w])
    report = lower(model, LowerConfig("cpu"))
    reasons = {r["op_type"]: r["reason"] for r in report.to_dict()["not_lowered"]}
    assert "1-D convolution is not lowered" in reasons["Conv"]
    assert [op["op_type"] for op in report.to_dict()["operators"]] == ["Gemm"]


def test_bad_configuration_raises_an_input_error() -> None:
    """The library checks what the CLI used to check alone."""
    with pytest.raises(QmpassInputError, match="unknown target 'tpu'"):
        LowerConfig("tpu")
    for samples in (0, -1, 1.5):
        with pytest.raises(QmpassInputError, match="--samples"):
            LowerConfig("cpu", samples=samples)  # type: ignore[arg-type]
    assert LowerConfig("cpu", samples=np.int64(2)).samples == 2


def test_host_ops_are_counted_right_in_a_graph_without_node_names() -> None:
    """Lowered MatMuls were matched by ``node.name``, so with unnamed nodes they (and a
    MatMul whose bias Add rides along) were counted as host ops too."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal(shape).astype(np.float32) for shape in ((16, 8), (8, 4)))
    bias = rng.standard_normal(8).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        [tensor("x", [2, 16])], [tensor("y", [2, 4])],
        initializers=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(bias, "b1"),
                      numpy_helper.from_array(w2, "w2")],
    )
    assert not any(node.name for node in model.graph.node)
    report = lower(model, LowerConfig("cpu"))
    assert [op["operator"] for op in report.to_dict()["operators"]] == ["MatMul_0", "MatMul_3"]
    assert dict(report.host_ops) == {"Relu": 1}
