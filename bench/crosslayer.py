"""Cross-layer shared bases chosen from QM-FRG clusters, with vs without (issue 12, item 5).

For every trained fixture (``models/``) and ``--keep`` in 0.75 / 0.5 / 0.25 (budget mode:
``--keep`` alone, every planned step kept), ``qmfrg`` is planned on the fixture's
calibration split with and without cross-layer sharing (``CompressConfig.crosslayer``),
and both written models are measured on the test split, which no plan or verification
saw: the weight fraction kept (measured), the relative output error and the top-1
accuracy. Where a shared basis was kept the budget lands on a slightly different size, so
the plan without sharing is also run at the kept fraction the shared plan measured
(``off, --keep K``: equal parameters). Then, per QM-FRG group the planner tried, what
became of it: ``shared`` (with its calibration error against the separate factorisations
at equal parameters), ``not_kept`` (planned, but the model without cross-layer bases
verified better on the held-out calibration inputs), ``not_chosen`` (sharing wins at
some rank, the budget chose otherwise) or ``declined`` (it loses at every rank; by how
much at the closest).

``OMP_NUM_THREADS=1 python bench/crosslayer.py [fixture ...]`` (one BLAS thread: on a
loaded 2-core machine, threaded BLAS on 64x64 matrices is 10-30x slower).
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
from qmpass.verify import accuracy, compare, run_model  # noqa: E402

KEEPS = (0.75, 0.5, 0.25)


def _short(name: str) -> str:
    """``/layers/layers.0/mlp/mlp.0/MatMul`` -> ``layers.0/mlp.0``."""
    parts = [p for p in name.split("/") if p and p not in ("MatMul", "Gemm", "attn", "mlp")]
    return "/".join(parts[-2:]) if len(parts) > 1 else (parts[0] if parts else name)


def main(names: list[str]) -> int:
    started = time.perf_counter()
    groups: list[str] = []
    print("| fixture | keep | cross-layer | kept (measured) | held-out rel. error | "
          "held-out accuracy | plan+verify s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in names or models.FIXTURES:
        original = onnx.load(str(models.fixture_path(name)))
        calib = models.load_calib(name)
        x, y = models.load_test_split(name)
        feeds = {"input": x}
        reference = run_model(original, feeds)
        base = accuracy(original, feeds, y)
        for keep in KEEPS:
            runs = [(keep, False, "off"), (keep, True, "on")]
            while runs:
                budget, crosslayer, label = runs.pop(0)
                timer = time.perf_counter()
                model, report = compress(original, CompressConfig(
                    keep=budget, calib=calib, crosslayer=crosslayer))
                seconds = time.perf_counter() - timer
                doc = report.to_dict()
                error = compare(reference, run_model(model, feeds), len(x)).relative_error
                print(f"| {name} | {keep} | {label} | "
                      f"{doc['keep_achieved']:.3f} | {error:.4f} | "
                      f"{accuracy(model, feeds, y):.4f} ({base:.4f}) | {seconds:.1f} |",
                      flush=True)
                if crosslayer:
                    groups.extend(_group_rows(name, keep, report.plan.shared_bases,
                                              doc["alternatives"]))
                    if any(b["status"] == "shared" for b in report.plan.shared_bases):
                        # the budget lands elsewhere with the shared unit: compare at the
                        # parameters the shared plan measured
                        runs.append((round(doc["keep_achieved"], 4), False,
                                     f"off, --keep {doc['keep_achieved']:.3f}"))
    print("\n| fixture | keep | QM-FRG group (mean Bures angle) | outcome | calibration "
          "error: shared vs separate at equal parameters |")
    print("|---|---|---|---|---|")
    print("\n".join(groups) if groups else "| (no group proposed on any fixture) | | | | |")
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


def _group_rows(name: str, keep: float, bases: tuple[dict, ...],  # type: ignore[type-arg]
                alternatives: dict[str, float]) -> list[str]:
    rows = []
    plain = " without cross-layer bases"
    verified = (min((v for k, v in alternatives.items() if plain not in k), default=None),
                min((v for k, v in alternatives.items() if plain in k), default=None))
    for b in bases:
        label = " + ".join(_short(o) for o in b["operators"])
        if b["status"] == "not_kept":
            measure = (f"rank {b['rank']}: {b['error']:.4g} vs {b['separate_error']:.4g} on "
                       f"its units, but the model verified at {b['verified_error']:.4g} "
                       f"with it vs {b['verified_error_without']:.4g} without")
        elif b["status"] == "shared":
            measure = (f"rank {b['rank']}: {b['error']:.4g} vs {b['separate_error']:.4g} "
                       f"(gain {b['gain']:.4g}); the model verified at {verified[0]:.4g} "
                       f"with it vs {verified[1]:.4g} without")
        else:
            best = min(b["measured"], key=lambda m: m["error"] - m["separate_error"],
                       default=None)
            which = "best" if b["status"] == "not_chosen" else "closest"
            measure = "no rank saves weights and work" if best is None else (
                f"{which} rank {best['rank']}: {best['error']:.4g} vs "
                f"{best['separate_error']:.4g} ({best['error'] - best['separate_error']:+.4g})")
        rows.append(f"| {name} | {keep} | {label} ({b['bures']:.3f}) | {b['status']} | "
                    f"{measure} |")
    return rows


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
