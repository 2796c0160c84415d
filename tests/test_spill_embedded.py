"""A large model whose proto holds its weights has them moved to a scratch file at load
(``modelio.spill_embedded``), and nothing a user sees changes: the same analysis, the
same compressed model in one file, the same report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import fixture_path

import models
import qmpass
from qmpass import scratch
from qmpass.cli import main
from qmpass.compress import CompressConfig
from qmpass.extdata import is_external, spilled
from qmpass.modelio import load_model, spill_embedded
from qmpass.verify import load_calib

NAME = "mlp_digits"


@pytest.fixture
def spill_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model is large enough to spill, every weight of 1 KB or more moves."""
    monkeypatch.setattr("qmpass.modelio.SPILL_BYTES", 0)
    monkeypatch.setattr(scratch, "SCRATCH_BYTES", 1024)


def _values(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _without_seconds(document: dict) -> dict:
    return {key: value for key, value in document.items() if key != "seconds"}


def test_spilled_weights_are_references_with_the_same_values(spill_all) -> None:
    path = fixture_path(NAME)
    original = {t.name: onnx.numpy_helper.to_array(t)
                for t in onnx.load(str(path)).graph.initializer}
    loaded = spill_embedded(load_model(path))
    assert loaded.spilled is not None
    assert loaded.folder == loaded.spilled.path.parent
    moved = [t for t in loaded.proto.graph.initializer if spilled(t)]
    assert moved and all(original[t.name].nbytes >= 1024 for t in moved)
    for tensor in loaded.proto.graph.initializer:
        if not is_external(tensor):
            assert original[tensor.name].nbytes < 1024
    from qmpass.extdata import tensor_array
    for tensor in moved:
        np.testing.assert_array_equal(tensor_array(tensor, loaded.folder),
                                      original[tensor.name])
    # a caller's proto is never changed, so never spilled
    assert spill_embedded(load_model(onnx.load(str(path)))).spilled is None


def test_analysis_of_a_spilled_model_is_the_same(spill_all, monkeypatch) -> None:
    spilled = qmpass.analyze(fixture_path(NAME))
    assert spilled.spilled is not None
    kept = spilled.operators[0].weight  # read from the scratch file the analysis keeps
    monkeypatch.setattr("qmpass.modelio.SPILL_BYTES", 1 << 60)
    plain = qmpass.analyze(fixture_path(NAME))
    assert plain.spilled is None
    np.testing.assert_array_equal(kept, plain.operators[0].weight)
    assert {op["weight_source"] for op in spilled.to_dict()["operators"]} == {"initializer"}
    spilled_doc, plain_doc = spilled.to_dict(), plain.to_dict()
    assert _without_seconds(spilled_doc) == _without_seconds(plain_doc)


def test_compress_of_a_spilled_model_writes_the_same_single_file(
        spill_all, monkeypatch, tmp_path) -> None:
    calib = models.MODELS_DIR / f"{NAME}_calib.npz"
    outputs = {}
    for label, limit in (("spilled", 0), ("plain", 1 << 60)):
        monkeypatch.setattr("qmpass.modelio.SPILL_BYTES", limit)
        out, report = tmp_path / f"{label}.onnx", tmp_path / f"{label}.json"
        assert main(["compress", str(fixture_path(NAME)), "-o", str(out), "--keep", "0.5",
                     "--calib", str(calib), "--report", str(report)]) == 0
        assert not (tmp_path / f"{label}.onnx.data").exists()  # one file, as the input
        model = onnx.load(str(out))
        assert not any(is_external(t) for t in model.graph.initializer)
        outputs[label] = (model, json.loads(report.read_text()))
    (spilled, spilled_doc), (plain, plain_doc) = outputs["spilled"], outputs["plain"]
    assert list(spilled.graph.node) == list(plain.graph.node)
    assert list(spilled.graph.input) == list(plain.graph.input)
    assert list(spilled.graph.output) == list(plain.graph.output)
    assert _values(spilled) == _values(plain)
    for key in ("rewrites", "params_after", "verification", "keep_achieved"):
        assert spilled_doc[key] == plain_doc[key]
    # the API returns a model holding its weights too
    model, _ = qmpass.compress(fixture_path(NAME), CompressConfig(
        keep=0.5, calib=load_calib(calib, onnx.load(str(fixture_path(NAME))))),
        keep_external=True)
    assert not any(is_external(t) for t in model.graph.initializer)


def test_a_result_left_with_external_weights_reads_them_wherever_it_goes(
        spill_all, monkeypatch) -> None:
    """A compressed model too large to take its weights back in (1 GB; patched to 0 here)
    refers to the load's scratch file by a location that does not depend on a folder,
    and the file outlives the compression."""
    import gc

    from qmpass.extdata import in_scratch, tensor_array

    monkeypatch.setattr("qmpass.extdata.PROTOBUF_LIMIT", 0)
    model, _ = qmpass.compress(fixture_path(NAME), CompressConfig(keep=0.5))
    gc.collect()
    unchanged = [t for t in model.graph.initializer if is_external(t) and t.name == "4.weight"]
    assert unchanged and all(in_scratch(t) for t in unchanged)
    assert tensor_array(unchanged[0]).shape == (10, 64)


def test_malformed_weights_are_left_for_the_checker_to_refuse(spill_all, tmp_path,
                                                              capsys) -> None:
    """A truncated large initializer is not moved (it cannot be read): the checker
    refuses the model in one sentence, exit 2, as without spilling."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    weight.raw_data = weight.raw_data[:-8]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["analyze", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "raw_data size" in error
