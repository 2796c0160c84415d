"""Realised speed-up of the qmpass Relax pass in TVM (llvm), next to onnxruntime's.

    python bench/tvm_speed.py [--batch 256] [--repeats 30] [--keep 0.5] [--no-wide]

For every fixture (and a wide MLP trained here on the digits, whose matmuls are large
enough for FLOPs rather than per-call overhead to set the time), one data-aware plan
(``qmfrg --keep 0.5`` with the calibration split) is applied twice: by ``QMPass`` to the
module imported with ``from_onnx`` and built with ``tvm.compile(target="llvm")``, and by
the ONNX rewriters (the same steps and tensors) for onnxruntime. Models with
convolutions get two rows, one per treatment of the convolutions (``convs``):
factorised (low-rank convs) and pruned (channel groups pruned with least-squares
compensation); the others have no convolution to treat. Latencies are medians of
``repeats`` runs of a ``batch``-sample input, original and compressed interleaved in one
process. Ideal: the ratio of the weight operators' FLOPs before and after the applied
steps, counted on the rewritten ONNX model. Prints a markdown table (docs/RESULTS.md,
part G).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402  (the fixtures live beside qmpass/)
from qmpass import CompressConfig  # noqa: E402
from qmpass.extract import extract_operators  # noqa: E402
from qmpass.tvm import QMPass, plan_onnx  # noqa: E402


def _vm_runner(mod: tvm.IRModule, x: np.ndarray) -> Callable[[], None]:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    arg = tvm.runtime.tensor(x)
    main = vm["main"]
    return lambda: main(arg)


def _ort_runner(model: onnx.ModelProto, x: np.ndarray) -> Callable[[], None]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle workers sleep instead of spinning: sessions timed in turn share the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    feed = {model.graph.input[0].name: x}
    return lambda: sess.run(None, feed)


def _medians(runs: Sequence[Callable[[], None]], repeats: int) -> list[float]:
    """Median seconds of each runner, interleaved so that drift hits all alike."""
    for run in runs:
        for _ in range(3):
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _has_conv(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "Conv" for node in model.graph.node)


def _wide_mlp() -> tuple[str, onnx.ModelProto, dict[str, np.ndarray], np.ndarray] | None:
    try:
        from models import wide_mlp

        model, calib, x_test = wide_mlp.build()
    except ImportError:
        print("(wide MLP skipped: pip install -e '.[models]' for torch)\n")
        return None
    return wide_mlp.NAME, model, calib, x_test


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--no-wide", action="store_true")
    args = parser.parse_args(argv)

    cases = []
    for name in models.FIXTURES:
        x, _ = models.load_test_split(name)
        cases.append((name, onnx.load(str(models.fixture_path(name))),
                      models.load_calib(name), x))
    if not args.no_wide:
        wide = _wide_mlp()
        if wide is not None:
            cases.append(wide)

    print(f"TVM {tvm.__version__} llvm, onnxruntime {ort.__version__}; batch {args.batch}, "
          f"medians of {args.repeats} interleaved runs; qmfrg --keep {args.keep} with "
          "calibration.\n")
    print("| model | convs | steps | ideal x | TVM original ms | TVM x | TVM / ideal |"
          " ORT original ms | ORT x | ORT / ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    both: tuple[Literal["factorise", "prune"], ...] = ("factorise", "prune")
    rows = [(case, convs) for case in cases
            for convs in (both if _has_conv(case[1]) else both[:1])]
    for (name, model, calib, x_all), convs in rows:
        reps = int(np.ceil(args.batch / len(x_all)))
        x = np.ascontiguousarray(np.concatenate([x_all] * reps)[: args.batch], np.float32)
        plan = plan_onnx(model, CompressConfig(keep=args.keep, calib=calib), convs=convs)
        mod = from_onnx(plan.model)
        rewrite = QMPass(plan).apply(mod)
        compressed_mod = rewrite.module
        compressed_onnx, _ = plan.compressed(rewrite.applied)
        steps = [plan.planned.plan.steps[i] for i in rewrite.applied]
        # counted on the rewritten model: the per-step costs of prune steps that share
        # an operator (a consumer of one group producing the next) do not add up
        before = sum(op.flops for op in plan.extraction.operators)
        after = sum(op.flops for op in extract_operators(compressed_onnx).operators)
        ideal = before / after
        t0, t1, o0, o1 = _medians(
            [_vm_runner(mod, x), _vm_runner(compressed_mod, x),
             _ort_runner(plan.model, x), _ort_runner(compressed_onnx, x)], args.repeats)
        treatment = convs if _has_conv(model) else "-"
        print(f"| {name} | {treatment} | {len(steps)} | {ideal:.2f} | {t0 * 1e3:.3f} | "
              f"{t0 / t1:.2f} | "
              f"{t0 / t1 / ideal:.2f} | {o0 * 1e3:.3f} | {o0 / o1:.2f} | "
              f"{o0 / o1 / ideal:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
