"""Every example script runs, and says what it promises (as onnx-graphsurgeon tests its
examples)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT, fixture_path


def test_tvm_build_script_builds_runs_and_agrees_with_onnxruntime() -> None:
    script = ROOT / "examples" / "tvm_build.py"
    done = subprocess.run(
        [sys.executable, str(script), str(fixture_path("mlp_digits")), "--keep", "0.5"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    applied = re.search(r"applied (\d+) of (\d+) steps", out)
    assert applied is not None and applied.group(1) == applied.group(2) != "0"
    agreement = re.search(r"TVM vs onnxruntime on the same plan ([0-9.e+-]+)", out)
    assert agreement is not None and float(agreement.group(1)) <= 1e-5
    accuracy = re.search(r"accuracy: original ([0-9.]+), compressed ([0-9.]+)", out)
    assert accuracy is not None and float(accuracy.group(2)) >= float(accuracy.group(1)) - 0.05
