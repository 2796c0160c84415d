"""Error-correcting factorisation (:func:`qmpass.plan.sequential.refit`) against the plain
whitened plan, on held-out data.

Per fixture and ``--keep`` in 0.75, 0.5, 0.25: a ``qmfrg`` plan (``align`` 8) from the
statistics of the calibration split, and the same plan with its low-rank and
shared-basis steps refitted sequentially on the calibration split. Both are applied
whole (no verification, no rollback) and measured on the held-out test split: the
relative output error ``||y' - y||_F / ||y||_F`` of the logits and the top-1 accuracy.
The relative error on the calibration split (the fitting data) is shown beside them.
The CNNs are planned with ``convs = "factorise"``: pruned (``"prune"``), they have no
low-rank step to refit.

Run from the repository root: ``python bench/sequential.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from qmpass.compress import calibration_stats  # noqa: E402
from qmpass.extract import extract_operators  # noqa: E402
from qmpass.extract.channels import channel_groups  # noqa: E402
from qmpass.modelio import stored_values  # noqa: E402
from qmpass.plan.plan import Step  # noqa: E402
from qmpass.plan.planner import PlanConfig, Planned, make_plan  # noqa: E402
from qmpass.plan.sequential import refit  # noqa: E402
from qmpass.rewrite import Applier  # noqa: E402
from qmpass.rewrite.base import name_nodes  # noqa: E402
from qmpass.verify import accuracy, run_batched  # noqa: E402

FIXTURES: tuple[tuple[str, Literal["prune", "factorise"]], ...] = (
    ("mlp_digits", "prune"),
    ("transformer_digits", "prune"),
    ("resnet_digits", "factorise"),
    ("resnet_digits_bn", "factorise"),
)
KEEPS = (0.75, 0.5, 0.25)


def _relative(reference: np.ndarray, output: np.ndarray) -> float:
    return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, nargs="*", default=list(KEEPS))
    args = parser.parse_args()
    print("| fixture | keep | refitted steps | calib rel. error plain / refit | "
          "held-out rel. error plain / refit | held-out accuracy plain / refit (original) |")
    print("|---|---|---|---|---|---|")
    started = time.perf_counter()
    for name, convs in FIXTURES:
        model = name_nodes(onnx.load(str(models.fixture_path(name))))
        calib = models.load_calib(name)
        x, y = models.load_test_split(name)
        test = {next(iter(calib)): x}
        extraction = extract_operators(model)
        groups = channel_groups(model)
        stats = calibration_stats(model, extraction, groups, "qmfrg", calib)
        applier = Applier(model, extraction, groups)
        reference = {"calib": run_batched(model, calib)[0], "test": run_batched(model, test)[0]}
        original = accuracy(model, test, y)
        for keep in args.keep:
            plain = make_plan(extraction, groups, stored_values(model), stats,
                              PlanConfig("qmfrg", keep=keep, align=8, convs=convs))
            fitted = refit(model, extraction, groups, plain, calib)
            cells: dict[str, list[str]] = {"calib": [], "test": [], "acc": []}
            for planned in (plain, fitted):
                built, declined = applier.build(_pairs(planned))
                assert not declined, declined
                for split, feeds in (("calib", calib), ("test", test)):
                    output = run_batched(built, feeds)[0]
                    cells[split].append(f"{_relative(reference[split], output):.4f}")
                cells["acc"].append(f"{accuracy(built, test, y):.4f}")
            count = sum(s.kind != "prune_channels" for s in plain.plan.steps)
            print(f"| {name} | {keep:g} | {count} | {' / '.join(cells['calib'])} | "
                  f"{' / '.join(cells['test'])} | {' / '.join(cells['acc'])} "
                  f"({original:.4f}) |")
    print(f"\n{time.perf_counter() - started:.1f} s; calibration split: "
          f"{next(iter(models.load_calib('mlp_digits').values())).shape[0]} samples, "
          f"test split: {models.load_test_split('mlp_digits')[0].shape[0]}")


def _pairs(planned: Planned) -> list[tuple[Step, dict[str, np.ndarray]]]:
    return list(zip(planned.plan.steps, planned.tensors, strict=True))


if __name__ == "__main__":
    main()
