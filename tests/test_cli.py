"""The command line: reports on every fixture, bad input -> one line, exit 2, no file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import const, fixture_path, make_model, tensor, trained_matrix
from onnx import helper

from qmpass.cli import main


def test_analyze_writes_json_and_html_for_every_fixture(fixture_names, tmp_path, capsys) -> None:
    for name in fixture_names:
        report, html = tmp_path / f"{name}.json", tmp_path / f"{name}.html"
        assert main(["analyze", str(fixture_path(name)), "--report", str(report),
                     "--html", str(html)]) == 0
        data = json.loads(report.read_text())
        assert data["totals"]["operators"] == len(data["operators"]) > 0
        for op in data["operators"]:
            assert op["weight_source"] == "initializer"
            assert 1.0 <= op["effective_rank"] <= min(op["matrix_shape"]) + 1
            kept = list(op["energy_kept"].values())
            assert kept == sorted(kept) and kept[-1] == pytest.approx(1.0)
        assert html.read_text().count("<img") >= 1
    out = capsys.readouterr().out
    assert "weight operators" in out


def test_analyze_counts_match_the_fixture_graphs(tmp_path) -> None:
    report = tmp_path / "r.json"
    main(["analyze", str(fixture_path("resnet_digits_bn")), "--report", str(report)])
    data = json.loads(report.read_text())
    assert len(data["operators"]) == 9  # 8 Conv + the Gemm head
    assert sum(op["folded_batchnorm"] is not None for op in data["operators"]) == 8
    assert data["totals"]["params"] == sum(op["params"] for op in data["operators"])


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = fixture_path("mlp_digits").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 3])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    w = trained_matrix(8, 16)
    w[0, 0] = float("nan")
    nan = tmp_path / "nan.onnx"
    onnx.save(make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         [tensor("x", [1, 16])], [tensor("y", [1, 8])], [const("w", w.T)]), nan)
    external = tmp_path / "external.onnx"
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [tensor("x", [1, 16])], [tensor("y", [1, 8])],
                       [const("w", trained_matrix(8, 16).T)])
    onnx.save_model(model, str(external), save_as_external_data=True, location="gone.bin",
                    size_threshold=0)
    (tmp_path / "gone.bin").unlink()
    return {"missing": tmp_path / "nope.onnx", "truncated": truncated, "text": text,
            "empty": empty, "nan": nan, "external": external}


def test_bad_input_gets_one_line_exit_2_and_no_file(tmp_path) -> None:
    for kind, path in _bad_inputs(tmp_path).items():
        out = tmp_path / "out" / f"{kind}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "qmpass", "analyze", str(path), "--report", str(out),
             "--html", str(out.with_suffix(".html"))],
            capture_output=True, text=True, check=False,
        )
        assert proc.returncode == 2, (kind, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qmpass: "), (kind, proc.stderr)
        assert not (tmp_path / "out").exists(), kind


def test_bad_usage_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze"])
    assert exit_info.value.code == 2
    assert main(["analyze", str(fixture_path("mlp_digits")), "--threshold", "3"]) == 2
    assert "threshold" in capsys.readouterr().err


def test_lower_checks_samples_through_the_library(tmp_path, capsys) -> None:
    """The CLI no longer repeats the library's checks; the answer is the same."""
    out = tmp_path / "out"
    assert main(["lower", str(fixture_path("mlp_digits")), "--target", "cpu", "-o", str(out),
                 "--samples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--samples must be at least 1" in err[0]
    assert not out.exists()


def test_demo_runs_with_no_arguments(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "qmpass", "demo"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in (tmp_path / "qmpass-demo").iterdir())
    assert written == [
        "analysis.html", "analysis.json", "compress.json", "compressed.onnx", "qmfrg.graphml"
    ]
    assert "q_proj" in proc.stdout
    report = json.loads((tmp_path / "qmpass-demo" / "compress.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["verification"]["relative_error"] <= 0.05
    assert "held-out accuracy" in proc.stdout


def test_spectral_clustering_option_and_graphml(tmp_path) -> None:
    report, graphml = tmp_path / "r.json", tmp_path / "g.graphml"
    args = ["analyze", str(fixture_path("transformer_digits")), "--clusters", "spectral",
            "--threshold", "0.3", "--report", str(report), "--graphml", str(graphml)]
    assert main(args) == 0
    data = json.loads(report.read_text())
    assert data["distances"]["threshold"] == 0.3
    clustered = [name for cluster in data["spectral_clusters"] for name in cluster]
    assert len(clustered) == len(set(clustered)) >= 2  # a partition, not overlapping groups
    assert graphml.read_text().count("<node ") == len(data["operators"])


def test_compress_writes_a_model_and_the_report_of_the_contract(tmp_path, capsys) -> None:
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    calib = fixture_path("mlp_digits").with_name("mlp_digits_calib.npz")
    assert main(["compress", str(fixture_path("mlp_digits")), "-o", str(out), "--keep", "0.5",
                 "--calib", str(calib), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after", "rewrites",
                "verification"):
        assert key in data
    assert {"max_abs_error", "relative_error", "inputs"} <= set(data["verification"])
    # 64 calibration samples: a quarter verifies (held out), the rest fit the plan
    assert data["verification"]["inputs"] == 16
    assert data["calibration_samples"] == {"fit": 48, "held_out": 16}
    for rewrite in data["rewrites"]:
        assert {"kind", "operators", "rank", "certificate"} <= set(rewrite)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert data["params_after"] < data["params_before"]
    assert "relative output error" in capsys.readouterr().out


def test_compress_bad_input_gets_one_line_exit_2_and_no_file(tmp_path) -> None:
    model = str(fixture_path("mlp_digits"))
    broken_calib = tmp_path / "calib.npz"
    np.savez(broken_calib, wrong=np.zeros((2, 64), dtype=np.float32))
    cases = {kind: [str(path)] for kind, path in _bad_inputs(tmp_path).items()}
    cases.update({
        "keep": [model, "--keep", "1.5"],
        "delta": [model, "--delta", "-1"],
        "both": [model, "--keep", "0.5", "--delta", "0.1"],
        "method": [model, "--method", "nope"],
        "calib": [model, "--calib", str(broken_calib)],
        "no calib": [model, "--calib", str(tmp_path / "none.npz")],
    })
    for kind, args in cases.items():
        out = tmp_path / "out" / "model.onnx"
        proc = subprocess.run(
            [sys.executable, "-m", "qmpass", "compress", *args, "-o", str(out),
             "--report", str(out.with_suffix(".json"))],
            capture_output=True, text=True, check=False,
        )
        assert proc.returncode == 2, (kind, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qmpass: "), (kind, proc.stderr)
        assert not (tmp_path / "out").exists(), kind
