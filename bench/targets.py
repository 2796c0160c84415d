"""Predicted cycles on the NPU-style targets (``hw_targets``), printed as Markdown tables.

A. **Declared numbers by source**: per target, how many parameters are vendor-sourced
   (V), secondary (S) or assumptions (U).
B. **Fixtures before and after compression**: predicted cycles of every weight operator
   (batch 1, the default shapes ``compress --target`` budgets at) of the original, of
   the ``qmpass compress --keep 0.5 --calib`` output (a budget of parameters) and of the
   ``--keep 0.5 --calib --target T`` output (a budget of T's cycles), tolerance 0.05;
   and the speed-up of the last at ``--batch 64``.
C. **GEMMs against the roofline**: predicted cycles of the chosen tiling divided by the
   target's roofline (all cores at peak, or every byte moved once at the chip's DRAM
   bandwidth), for GEMMs of at least 256^3 MACs; with and without the kernel's launch
   stage (``launch_cycles``, an assumption).
D. **Op-type weights c_m (paper eq. 9)**: cycles per MAC of a convolution divided by
   those of a matmul with the same GEMM shape, next to the paper's stated values.
E. **"2.1x on Kunlunxin from fusing redundant attention heads"**: cycles of the
   transformer fixture's Q, K and V projections as three kernels against one fused kernel
   (the same MACs), and the same at a BERT-base shape.

Run from the repository root: ``python bench/targets.py`` (``--parts ABCDE``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import hw_targets  # noqa: E402
import models  # noqa: E402
from hw_targets.spec import GemmSpec  # noqa: E402
from qmpass.compress import CompressConfig, compress  # noqa: E402
from qmpass.extract import extract_operators  # noqa: E402
from qmpass.extract.shapes import infer_shapes  # noqa: E402
from qmpass.plan.resource import Cycles  # noqa: E402

TARGETS = hw_targets.TARGET_NAMES


def declared() -> None:
    print("\n## A. Declared numbers by source\n")
    print("| target | dialect | V | S | U | assumptions (U) |")
    print("|---|---|---|---|---|---|")
    for name in TARGETS:
        target = hw_targets.get_target(name).TARGET
        rows = target.table()
        tags = Counter(str(r["tag"]) for r in rows)
        assumed = ", ".join(str(r["name"]) for r in rows if r["tag"] == "U")
        print(f"| {name} | {target.dialect} | {tags['V']} | {tags['S']} | {tags['U']} | "
              f"{assumed} |")


def _cycles(model: onnx.ModelProto, target: str) -> int:
    resource = Cycles(target, infer_shapes(model))
    return round(resource.operators(extract_operators(model).operators))


def fixtures() -> None:
    print("\n## B. Fixtures: predicted cycles of the weight operators (batch 1)\n")
    print("| fixture | target | original | keep 0.5 of params | ratio | keep 0.5 of cycles "
          "| ratio | params kept (cycle budget) | at batch 64: cycle budget ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in models.FIXTURES:
        path = models.fixture_path(name)
        model = onnx.load(str(path))
        with np.load(path.with_name(f"{name}_calib.npz")) as data:
            calib = {key: data[key] for key in data.files}
        by_params, _ = compress(model, CompressConfig(keep=0.5, calib=calib))
        for target in TARGETS:
            before = _cycles(model, target)
            after_params = _cycles(by_params, target)
            _, report = compress(model, CompressConfig(keep=0.5, calib=calib, target=target))
            doc = report.to_dict()
            after_cycles = doc["target"]["cycles_after"]
            _, batched = compress(model, CompressConfig(keep=0.5, calib=calib, target=target,
                                                        batch=64))
            at_64 = batched.to_dict()["target"]
            print(f"| {name} | {target} | {before:,} | {after_params:,} | "
                  f"{before / after_params:.2f}x | {after_cycles:,} | "
                  f"{before / after_cycles:.2f}x | {doc['keep_achieved']:.2f} | "
                  f"{at_64['cycles_before'] / at_64['cycles_after']:.2f}x |")


def roofline(shapes: Sequence[tuple[int, int, int]]) -> None:
    print("\n## C. GEMMs against the roofline (predicted / roofline; goal <= 1.3)\n")
    print("Each cell: with the launch stage / without it (tiling M x N x K).\n")
    print("| m x k x n | " + " | ".join(TARGETS) + " |")
    print("|---|" + "---|" * len(TARGETS))
    for m, k, n in shapes:
        cells = []
        for name in TARGETS:
            module = hw_targets.get_target(name)
            spec = GemmSpec("g", m, k, n)
            tiling = module.tiling(spec, module.TARGET)
            predicted = module.cost(spec, tiling, module.TARGET).cycles
            bare = predicted - hw_targets.base.launch_cycles(module.TARGET)
            bound = hw_targets.roofline(spec, module.TARGET)
            cells.append(f"{predicted / bound:.2f} / {bare / bound:.2f} ({tiling.tile_m}x"
                         f"{tiling.tile_n}x{tiling.tile_k})")
        print(f"| {m} x {k} x {n} | " + " | ".join(cells) + " |")


def conv_weights() -> None:
    print("\n## D. Op-type weight c_conv implied by the cost models (paper eq. 9)\n")
    layers = [
        ("3x3, 64->64, 56x56", hw_targets.ConvLayer((1, 64, 56, 56), 64, 3)),
        ("3x3, 32->64, 28x28", hw_targets.ConvLayer((1, 32, 28, 28), 64, 3)),
        ("3x3, 16->16, 8x8 (fixture)", hw_targets.ConvLayer((1, 16, 8, 8), 16, 3)),
        ("1x1, 64->256, 56x56", hw_targets.ConvLayer((1, 64, 56, 56), 256, 1)),
    ]
    print("| conv layer | " + " | ".join(TARGETS) + " |")
    print("|---|" + "---|" * len(TARGETS))
    for label, layer in layers:
        cells = [f"{hw_targets.conv_weight(m, m.TARGET, layer):.2f}"
                 for m in map(hw_targets.get_target, TARGETS)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    stated = {name: hw_targets.get_target(name).TARGET.params.get("paper_c_conv")
              for name in TARGETS}
    paper = ", ".join(f"{t} {p.value}" for t, p in stated.items() if p is not None)
    print(f"\nThe paper states c_conv = {paper}.")


def attention_fusion() -> None:
    print("\n## E. Fusing the Q, K and V projections: three kernels vs one\n")
    model = onnx.load(str(models.fixture_path("transformer_digits")))
    extraction = extract_operators(model)
    qkv = next(g for g in extraction.fusion_groups if len(g) == 3)
    ops = {op.name: op for op in extraction.operators}
    first = ops[qkv[0]]
    rows = first.flops // (2 * first.shape[0] * first.shape[1])
    d_in, d_out = first.shape[1], first.shape[0]
    cases = [("transformer_digits", rows, d_in, d_out), ("BERT-base, 128 tokens", 128, 768, 768)]
    print("| shapes | target | Q+K+V (3 kernels) | fused (1 kernel) | speed-up |")
    print("|---|---|---|---|---|")
    for label, m, k, n in cases:
        for name in TARGETS:
            module = hw_targets.get_target(name)
            one = hw_targets.lower_matmul(module, module.TARGET, "q", m, k, n, True).cycles()
            fused = hw_targets.lower_matmul(module, module.TARGET, "qkv", m, k, 3 * n,
                                            True).cycles()
            print(f"| {label}: {m} x {k} x 3 x {n} | {name} | {3 * one:,} | {fused:,} | "
                  f"{3 * one / fused:.2f}x |")
    claim = hw_targets.get_target("kunlunxin").TARGET.params["paper_attention_fusion_speedup"]
    print(f"\nThe paper claims {claim.value}x on Kunlunxin from fusing redundant attention "
          "heads.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--parts", default="ABCDE", help="which parts to run")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if "A" in args.parts:
        declared()
    if "B" in args.parts:
        fixtures()
    if "C" in args.parts:
        roofline([(256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (128, 768, 3072),
                  (512, 768, 3072), (2048, 2048, 2048)])
    if "D" in args.parts:
        conv_weights()
    if "E" in args.parts:
        attention_fusion()
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
