"""Models with external data: read a tensor at a time, written with their own data file.

The same model saved embedded and with external data must analyse, compress and lower
to the same results; the compressed output keeps external data (``<out>.data``) and runs
in onnxruntime from its path; outputs never overwrite an input's data file; a missing or
truncated data file is bad input (exit 2, one line).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import fixture_path

from qmpass import extdata
from qmpass.analysis import analyze
from qmpass.cli import main
from qmpass.extdata import data_folder, model_payloads
from qmpass.extract import extract_operators
from qmpass.modelio import load_model, write_all_atomic
from qmpass.verify import runner

FIXTURE = "transformer_digits"


def _pair(tmp_path: Path, name: str = FIXTURE) -> tuple[Path, Path]:
    """The fixture embedded (as shipped) and saved with all tensors in ``weights.bin``."""
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(fixture_path(name))), str(external),
                    save_as_external_data=True, location="weights.bin", size_threshold=0)
    return fixture_path(name), external


def _calib(name: str = FIXTURE) -> Path:
    return fixture_path(name).with_name(f"{name}_calib.npz")


def _without(report: dict, *keys: str) -> dict:
    return {k: v for k, v in report.items() if k not in keys}


def test_analysis_is_the_same_and_holds_no_weight(tmp_path) -> None:
    embedded, external = _pair(tmp_path)
    first, second = analyze(str(embedded)).to_dict(), analyze(str(external)).to_dict()
    assert {op["weight_source"] for op in second["operators"]} == {"external_data"}
    for report in (first, second):
        for op in report["operators"]:
            op.pop("weight_source")
    assert _without(first, "model", "seconds") == _without(second, "model", "seconds")
    loaded = load_model(external)
    assert not loaded.proto.graph.initializer[0].HasField("raw_data")  # never loaded
    with data_folder(loaded.folder):
        ops = extract_operators(loaded.proto, loaded.external).operators
    eager = extract_operators(onnx.load(str(embedded))).operators
    assert all(op.lazy for op in ops) and not any(op.lazy for op in eager)
    for lazy, held in zip(ops, eager, strict=True):
        assert lazy.shape == held.shape
        assert np.array_equal(lazy.weight, held.weight)  # read again, bit for bit


def test_compress_gives_the_same_model_written_with_its_own_data(tmp_path) -> None:
    embedded, external = _pair(tmp_path)
    out = {}
    for kind, model in (("embedded", embedded), ("external", external)):
        out[kind] = tmp_path / f"{kind}.onnx"
        assert main(["compress", str(model), "-o", str(out[kind]), "--keep", "0.75",
                     "--calib", str(_calib()), "--report", str(tmp_path / f"{kind}.json")]) == 0
    reports = [json.loads((tmp_path / f"{k}.json").read_text()) for k in out]
    assert _without(reports[0], "model", "seconds") == _without(reports[1], "model", "seconds")
    data = tmp_path / "external.onnx.data"
    assert data.is_file() and not (tmp_path / "embedded.onnx.data").exists()
    written = onnx.load(str(out["external"]), load_external_data=False)
    assert {e.value for t in extdata.external_tensors(written) for e in t.external_data
            if e.key == "location"} == {data.name}
    onnx.checker.check_model(str(out["external"]), full_check=True)
    with np.load(_calib()) as calib:
        feeds = {k: calib[k][:8] for k in calib.files}
    results = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
               for p in out.values()]
    assert np.array_equal(results[0][0], results[1][0])
    assert (tmp_path / "ext" / "weights.bin").stat().st_size > 0  # the input is untouched


def test_lower_is_the_same(tmp_path) -> None:
    embedded, external = _pair(tmp_path, "mlp_digits")
    reports = []
    for kind, model in (("embedded", embedded), ("external", external)):
        assert main(["lower", str(model), "--target", "cpu", "-o", str(tmp_path / kind)]) == 0
        reports.append(json.loads((tmp_path / kind / "lowering.json").read_text()))
    assert _without(reports[0], "model", "seconds") == _without(reports[1], "model", "seconds")


def test_the_output_never_overwrites_the_input_data(tmp_path, capsys) -> None:
    # the input's data file is b.onnx.data: an output b.onnx would write its data there
    onnx.save_model(onnx.load(str(fixture_path("mlp_digits"))), str(tmp_path / "a.onnx"),
                    save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    before = (tmp_path / "b.onnx.data").read_bytes()
    code = main(["compress", str(tmp_path / "a.onnx"), "-o", str(tmp_path / "b.onnx"),
                 "--keep", "0.5"])
    assert code == 2
    assert "input of this command" in capsys.readouterr().err
    assert (tmp_path / "b.onnx.data").read_bytes() == before
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "escaping"])
def test_broken_external_data_is_bad_input(tmp_path, capsys, damage) -> None:
    _, external = _pair(tmp_path, "mlp_digits")
    data = external.with_name("weights.bin")
    if damage == "missing":
        data.unlink()
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:-100])
    else:
        model = onnx.load(str(external), load_external_data=False)
        for tensor in extdata.external_tensors(model):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../weights.bin"
        external.write_bytes(model.SerializeToString())
    for command in (["analyze"], ["compress", "-o", str(tmp_path / "o.onnx")],
                    ["lower", "--target", "cpu", "-o", str(tmp_path / "low")]):
        assert main([command[0], str(external), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("qmpass: ")
        assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "low").exists()


def test_models_past_the_protobuf_limit_run_and_write(tmp_path, monkeypatch) -> None:
    """Shrunk limits take the paths a model over 2 GB takes: onnxruntime gets the large
    initializers as arrays, the writer moves them into a data file."""
    model = onnx.load(str(fixture_path("mlp_digits")))
    with np.load(_calib("mlp_digits")) as calib:
        feeds = {k: calib[k][:4] for k in calib.files}
    expected = runner.run_model(model, feeds)
    monkeypatch.setattr(runner, "_IN_MEMORY_LIMIT", 1)
    monkeypatch.setattr(extdata, "PROTOBUF_LIMIT", 2)
    assert np.array_equal(runner.run_model(model, feeds)[0], expected[0])
    path = tmp_path / "big.onnx"
    payloads = model_payloads(model, path)
    assert [p for p, _ in payloads] == [path, tmp_path / "big.onnx.data"]
    write_all_atomic(payloads)
    assert not onnx.load(str(path), load_external_data=False).graph.initializer[0].HasField(
        "raw_data")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, feeds)[0], expected[0])


def test_a_failing_data_writer_leaves_nothing(tmp_path) -> None:
    def broken(handle: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_all_atomic([(tmp_path / "m.onnx", b"model"), (tmp_path / "m.onnx.data", broken)])
    assert list(tmp_path.iterdir()) == []


def test_projections_pushed_out_of_memory_come_back_from_disk_the_same(monkeypatch) -> None:
    """With no memory for held projections every unit's basis waits on disk until built,
    and is read back, not computed again: the plan and the model are the same."""
    from qmpass.compress import CompressConfig, compress
    from qmpass.plan import factors
    from qmpass.plan.units import lowrank

    calls = [0]
    original_projection = lowrank.projection

    def counted(*args, **kwargs):
        calls[0] += 1
        return original_projection(*args, **kwargs)

    monkeypatch.setattr(lowrank, "projection", counted)
    model = onnx.load(str(fixture_path(FIXTURE)))
    with np.load(_calib()) as calib:
        config = CompressConfig(keep=0.5, calib={k: calib[k] for k in calib.files})
    held, held_report = compress(model, config)
    computed = calls[0]
    monkeypatch.setattr(factors, "HELD_BYTES", 0)
    again, report = compress(model, config)
    assert calls[0] == 2 * computed  # each unit decomposed once per compress
    assert again.SerializeToString() == held.SerializeToString()
    assert _without(report.to_dict(), "seconds") == _without(held_report.to_dict(), "seconds")


def test_the_paths_of_models_too_large_to_hold_twice_give_the_same_model(
        tmp_path, monkeypatch) -> None:
    """Shrunk thresholds take the paths of a model whose statistics and new weights do not
    fit in memory: covariances collected in several passes and kept on disk, the plan's
    new weights parked on disk, the rewrites' new tensors written to a scratch file and
    handed to onnxruntime as maps of it. The written model is the same, bit for bit."""
    from qmpass import scratch, spill
    from qmpass.compress import calibration
    from qmpass.rewrite import base

    embedded, external = _pair(tmp_path)
    args = ["--keep", "0.5", "--calib", str(_calib())]
    assert main(["compress", str(embedded), "-o", str(tmp_path / "held.onnx"), *args,
                 "--report", str(tmp_path / "held.json")]) == 0
    monkeypatch.setattr(calibration, "STATS_BYTES", 1)
    monkeypatch.setattr(spill, "PARK_BYTES", 0)
    monkeypatch.setattr(base, "SCRATCH_BYTES", 0)
    puts = []
    original_put = scratch.Scratch.put
    monkeypatch.setattr(scratch.Scratch, "put", lambda self, name, array: (
        puts.append(name), original_put(self, name, array))[1])
    assert main(["compress", str(external), "-o", str(tmp_path / "parked.onnx"), *args,
                 "--report", str(tmp_path / "parked.json")]) == 0
    assert puts  # the new weights went through the scratch file
    reports = [json.loads((tmp_path / f"{k}.json").read_text()) for k in ("held", "parked")]
    assert _without(reports[0], "model", "seconds") == _without(reports[1], "model", "seconds")
    written = onnx.load(str(tmp_path / "parked.onnx"), load_external_data=False)
    assert {e.value for t in extdata.external_tensors(written) for e in t.external_data
            if e.key == "location"} == {"parked.onnx.data"}  # nothing refers to scratch
    with np.load(_calib()) as calib:
        feeds = {k: calib[k][:8] for k in calib.files}
    results = [ort.InferenceSession(str(tmp_path / f"{k}.onnx"),
                                    providers=["CPUExecutionProvider"]).run(None, feeds)
               for k in ("held", "parked")]
    assert np.array_equal(results[0][0], results[1][0])


def test_a_kept_scratch_file_stays_until_released() -> None:
    import gc

    from qmpass import scratch

    with scratch.scratch_file() as kept:
        reference = kept.put("w", np.arange(6, dtype=np.float32).reshape(2, 3))
        kept.kept = True
    with scratch.scratch_file() as dropped:
        dropped.put("v", np.ones(4, np.float32))
    location = reference.external_data[0].value
    assert extdata.in_scratch(reference)
    np.testing.assert_array_equal(extdata.tensor_array(reference),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))
    path, other = kept.path, dropped.path
    del kept, dropped
    gc.collect()
    assert path.is_file() and not other.exists()  # an unkept file goes with its block
    scratch.release()
    gc.collect()
    assert not path.exists() and scratch.resolve(location) is None
