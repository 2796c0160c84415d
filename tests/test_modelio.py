"""Atomic writes: whole files with ordinary permissions, nothing left on failure."""

from __future__ import annotations

import os
import stat

import pytest

from qmpass.modelio import write_atomic


def test_written_file_has_the_permissions_open_would_give(tmp_path) -> None:
    path = tmp_path / "sub" / "report.json"
    write_atomic(path, "{}")
    assert path.read_text() == "{}"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_a_failed_write_leaves_nothing(tmp_path) -> None:
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "x.bin", 42)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_model_read_from_a_file_is_brought_to_caller_form_in_place(tmp_path) -> None:
    """compress edits the proto it read itself (nodes named, IR 3 -> 4 without the
    initializer inputs) rather than a copy of every weight; a caller's proto is copied
    and left as it was."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qmpass.modelio import load_model
    from qmpass.rewrite.base import working_form

    weight = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              ir_version=3)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))

    loaded = load_model(path)
    assert loaded.owned
    form = working_form(loaded.proto, owned=True)
    assert form is loaded.proto
    assert form.ir_version == 4 and [i.name for i in form.graph.input] == ["x"]
    assert form.graph.node[0].name == "MatMul_0"

    given = load_model(model)
    assert not given.owned
    copy = working_form(given.proto, owned=False)
    assert copy is not model and copy.ir_version == 4 and copy.graph.node[0].name
    assert model.ir_version == 3 and len(model.graph.input) == 2
    assert not model.graph.node[0].name
