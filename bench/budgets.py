"""Budgets met and held-out fidelity at equal parameters, per method (issue 12).

For every trained fixture (``models/``) and ``--keep`` in 0.75 / 0.5 / 0.25 (budget mode:
``--keep`` alone, every planned step kept), each method is fitted on the fixture's
calibration split and measured on its test split, which no plan or verification saw:
the weight fraction kept (measured on the written model), the relative output error and
the top-1 accuracy (the original's in the header).

Methods: ``svd`` (plain truncated SVD) and ``whitened`` (per-layer whitened truncation, the
SVD-LLM anchor), each keeping the same fraction of every operator as their papers do;
``whitened --allocation lagrangian`` (the same truncations, the budget shared by the
Lagrangian on each layer's own error); ``qmfrg --pricing layer`` (qmpass's plan priced by
each unit's own error: the allocation before issue 12 item 4); ``qmfrg`` (the default:
priced by what the model's output feels of each unit, measured on the fitting inputs) and
``qmfrg --refit auto``.

``python bench/budgets.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from qmpass import CompressConfig, compress  # noqa: E402
from qmpass.verify import accuracy, compare, load_calib, run_model  # noqa: E402

KEEPS = (0.75, 0.5, 0.25)
METHODS = {
    "svd": {"method": "svd"},
    "whitened (uniform)": {"method": "whitened"},
    "whitened --allocation lagrangian": {"method": "whitened", "allocation": "lagrangian"},
    "qmfrg --pricing layer": {"pricing": "layer"},
    "qmfrg (default)": {},
    "qmfrg --refit auto": {"refit": "auto"},
}


def main() -> int:
    started = time.perf_counter()
    print("| fixture | keep | method | kept (measured) | held-out rel. error | "
          "held-out accuracy |")
    print("|---|---|---|---:|---:|---:|")
    for name in models.FIXTURES:
        original = onnx.load(str(models.fixture_path(name)))
        calib = load_calib(models.MODELS_DIR / f"{name}_calib.npz", original)
        x, y = models.load_test_split(name)
        feeds = {"input": x}
        reference = run_model(original, feeds)
        base = accuracy(original, feeds, y)
        for keep in KEEPS:
            for label, extra in METHODS.items():
                model, report = compress(original, CompressConfig(keep=keep, calib=calib,
                                                                  **extra))  # type: ignore[arg-type]
                doc = report.to_dict()
                error = compare(reference, run_model(model, feeds), len(x)).relative_error
                print(f"| {name} | {keep} | {label} | {doc['keep_achieved']:.3f} | "
                      f"{error:.4f} | {accuracy(model, feeds, y):.4f} ({base:.4f}) |",
                      flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
