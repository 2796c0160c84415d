"""A TVM build script with qmpass: ONNX file -> Relax -> qmpass pass -> build -> run.

    python examples/tvm_build.py [MODEL.onnx] [--calib INPUTS.npz] [--keep F]
                                 [--test TEST.npz] [--convs prune|factorise]

Without arguments it builds the bundled transformer (trained on scikit-learn's digits)
with its calibration split, keeping half the weight parameters, and reports the held-out
accuracy before and after. The plan is made once on the ONNX model
(``qmpass.tvm.plan_onnx``, as ``qmpass compress`` plans it); the Relax pass applies the
same steps with the same factors, so the TVM build computes what the compressed ONNX
model computes in onnxruntime (checked below).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from qmpass import CompressConfig
from qmpass.tvm import QMPass, RelaxResult, plan_onnx
from qmpass.verify import run_model

MODELS = Path(__file__).resolve().parent.parent / "models"


def build(mod: tvm.IRModule) -> relax.VirtualMachine:
    return relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(MODELS / "transformer_digits.onnx"))
    parser.add_argument("--calib", help=".npz keyed by graph input name")
    parser.add_argument("--test", help=".npz with x (inputs) and y (labels)")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--convs", choices=("prune", "factorise"), default="prune")
    args = parser.parse_args(argv)
    stem = Path(args.model).with_suffix("")
    calib_path = args.calib or (f"{stem}_calib.npz" if Path(f"{stem}_calib.npz").exists()
                                else None)
    test_path = args.test or (f"{stem}_test.npz" if Path(f"{stem}_test.npz").exists()
                              else None)
    calib = dict(np.load(calib_path)) if calib_path else None

    # 1. plan on the ONNX model (data-aware with calibration inputs)
    plan = plan_onnx(onnx.load(args.model), CompressConfig(keep=args.keep, calib=calib),
                     convs=args.convs)
    # 2. import into Relax and run the pass in a pipeline with TVM's own passes
    mod = from_onnx(plan.model)
    results: list[RelaxResult] = []  # the pass reports what it did with each step here
    pipeline = tvm.transform.Sequential([
        QMPass(plan, report=results.append),
        relax.transform.CombineParallelMatmul(),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ])
    compressed = pipeline(mod)
    (qmpass,) = results
    for outcome in qmpass.outcomes:
        step = outcome.step
        size = f"rank={step.rank}" if step.kept is None else \
            f"kept={len(step.kept)}/{step.channels}"
        print(f"step {outcome.index}: {step.kind} {size} of "
              f"{', '.join(step.operators)} -> {outcome.status}"
              + (f" ({outcome.reason})" if outcome.reason else ""))
    # 3. build both, run on the Relax VM
    original_vm, compressed_vm = build(mod), build(compressed)
    name = plan.model.graph.input[0].name
    if test_path:
        with np.load(test_path) as data:
            x, y = data["x"], data["y"]
    else:
        x, y = (calib or {}).get(name), None
    if x is None:
        print("no inputs to run on (give --calib or --test)")
        return 0
    before = original_vm["main"](tvm.runtime.tensor(x)).numpy()
    after = compressed_vm["main"](tvm.runtime.tensor(x)).numpy()
    # 4. the same plan through the ONNX rewriters, in onnxruntime
    onnx_model, _ = plan.compressed(qmpass.applied)
    reference = run_model(onnx_model, {name: x})[0]
    agreement = np.linalg.norm(after - reference) / np.linalg.norm(reference)
    change = np.linalg.norm(after - before) / np.linalg.norm(before)
    print(f"applied {len(qmpass.applied)} of {len(qmpass.outcomes)} steps; "
          f"relative change of the output {change:.4f}; "
          f"TVM vs onnxruntime on the same plan {agreement:.2e}")
    if y is not None:
        print(f"accuracy: original {np.mean(before.argmax(-1) == y):.4f}, "
              f"compressed {np.mean(after.argmax(-1) == y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
