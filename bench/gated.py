"""One model, many budgets: the level table of a budget-gated model (issue 15).

For the trained transformer fixture (budgets 1, 0.75, 0.5) and the trained wide MLP of
``models/wide_mlp.py`` (64-1024-1024-1024-10, budgets 1, 0.5, 0.25; needs torch, trained
here), ``compress --budgets`` makes one gated model, fitted on the calibration split.
Per level, measured on the test split (which neither the plan nor the verification saw):

* parameters and FLOPs of the weight operators in use at that level;
* the relative output error against the original and the top-1 accuracy, for the
  gated model at that level and for a standalone ``compress --keep <budget>`` (and
  ``--refit on``, the error-correcting second factors, which are not nested and so not
  gated: the column says what gating without them gives up);
* onnxruntime latency (CPU, one intra-op thread: the work a level does, not how threads
  are scheduled on a shared machine) of one run over the whole test split and of one
  sample, the median of ``ROUNDS`` timings taken in interleaved rounds (every model once
  per round) so load on the machine hits all of them alike.

Last, where a gated level's time goes at batch 1, on one 1024-wide layer pair at rank
192 of 256 stored: constant factors (a standalone model), the same factors fed as inputs
(not constants: no pre-packing), and the gated form (``Slice`` of the stored factors).

``python bench/gated.py``
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import models  # noqa: E402
from qmpass.compress import CompressConfig, compress, compress_gated  # noqa: E402
from qmpass.rewrite.gated_lowrank import GATED_INPUT  # noqa: E402
from qmpass.verify import accuracy, compare, run_model  # noqa: E402
from qmpass.verify.runner import session  # noqa: E402

ROUNDS = 15


def _cases() -> list[tuple[str, onnx.ModelProto, dict[str, np.ndarray], np.ndarray,
                           np.ndarray, tuple[float, ...]]]:
    name = "transformer_digits"
    model = onnx.load(str(models.fixture_path(name)))
    calib = models.load_calib(name)
    x, y = models.load_test_split(name)
    cases = [(name, model, calib, x, y, (1.0, 0.75, 0.5))]
    try:
        from models import _common, wide_mlp
    except ImportError as exc:  # torch is the models extra
        print(f"(wide MLP skipped: {exc})")
        return cases
    wide, wide_calib, x_test = wide_mlp.build()
    y_test = _common.load_split((64,)).y_test
    cases.append((wide_mlp.NAME, wide, wide_calib, x_test, y_test, (1.0, 0.5, 0.25)))
    return cases


def _latencies(runs: dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]],
               batch: int | None) -> dict[str, float]:
    """Median ms of one run on the first ``batch`` samples (None: the feeds as they are),
    per key, over ROUNDS interleaved rounds (after a warm-up), single-threaded."""
    sessions = {k: (session(m, threads=1),
                    {n: a if a.ndim == 0 or batch is None else a[:batch]
                     for n, a in feeds.items()})
                for k, (m, feeds) in runs.items()}
    repeat = max(1, 256 // (batch or 1))  # runs per timing, so short runs are not all timer noise
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(2):
        for sess, feeds in sessions.values():
            sess.run(None, feeds)
    for _ in range(ROUNDS):
        for key, (sess, feeds) in sessions.items():
            start = time.perf_counter()
            for _ in range(repeat):
                sess.run(None, feeds)
            times[key].append((time.perf_counter() - start) / repeat)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _error(reference: list[np.ndarray], model: onnx.ModelProto,
           feeds: dict[str, np.ndarray], samples: int) -> float:
    return compare(reference, run_model(model, feeds), samples).relative_error


def _slice_cost(width: int = 1024, stored: int = 256, rank: int = 192) -> None:
    """Batch-1 time of one factor pair three ways (see the module docstring)."""
    rng = np.random.default_rng(0)
    first_t = rng.normal(size=(width, stored)).astype(np.float32)  # x @ first^T
    second_t = rng.normal(size=(stored, width)).astype(np.float32)
    x = rng.normal(size=(1, width)).astype(np.float32)
    pair = [helper.make_node("MatMul", ["x", "a"], ["h"]),
            helper.make_node("MatMul", ["h", "b"], ["y"])]

    def build(nodes: list[onnx.NodeProto], inputs: list[tuple[str, list[int], int]],
              inits: dict[str, np.ndarray]) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes, "pair", [helper.make_tensor_value_info(n, t, s) for n, s, t in inputs],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    a, b = np.ascontiguousarray(first_t[:, :rank]), np.ascontiguousarray(second_t[:rank])
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    runs = {
        "constant factors": (build(pair, [("x", [1, width], f32)], {"a": a, "b": b}),
                             {"x": x}),
        "factors fed as inputs": (build(pair, [("x", [1, width], f32), ("a", [width, rank], f32),
                                               ("b", [rank, width], f32)], {}),
                                  {"x": x, "a": a, "b": b}),
        "sliced (gated)": (build(
            [helper.make_node("Slice", ["a_all", "zero", "q", "one"], ["a"]),
             helper.make_node("Slice", ["b_all", "zero", "q", "zero"], ["b"]), *pair],
            [("x", [1, width], f32), ("q", [1], i64)],
            {"a_all": first_t, "b_all": second_t, "zero": np.array([0]),
             "one": np.array([1])}), {"x": x, "q": np.array([rank])}),
    }
    latency = _latencies(runs, None)
    print(f"\n### batch 1, one {width}-wide pair at rank {rank} ({stored} stored), "
          "single-threaded\n")
    print("| form | ms | vs constant |\n|---|---:|---:|")
    for key, ms in latency.items():
        print(f"| {key} | {ms:.4f} | {ms / latency['constant factors']:.2f}x |")


def main() -> int:
    started = time.perf_counter()
    for name, original, calib, x, y, budgets in _cases():
        feeds = {original.graph.input[0].name: x}
        reference = run_model(original, feeds)
        gated, report = compress_gated(original, CompressConfig(budgets=budgets, calib=calib),
                                       standalone=False)
        runs = {"original": (original, feeds)}
        rows = []
        for row in report.levels:
            level_feeds = {**feeds, GATED_INPUT: np.array(row.level)}
            runs[f"level {row.level}"] = (gated, level_feeds)
            if row.budget < 1.0:
                alone, _ = compress(original, CompressConfig(keep=row.budget, calib=calib))
                refit, _ = compress(original, CompressConfig(keep=row.budget, calib=calib,
                                                             refit="on"))
            else:
                alone = refit = original
            runs[f"alone {row.level}"] = (alone, feeds)
            rows.append((row, _error(reference, gated, level_feeds, len(x)),
                         accuracy(gated, level_feeds, y), _error(reference, alone, feeds, len(x)),
                         accuracy(alone, feeds, y), _error(reference, refit, feeds, len(x))))
        latency = {batch: _latencies(runs, batch) for batch in (len(x), 1)}
        doc = report.to_dict()
        print(f"\n### {name}: {len(x)} test samples, budgets {', '.join(map(str, budgets))}")
        print(f"\noriginal: {report.operator_params:,} weight-operator parameters, "
              f"{report.operator_flops:,} FLOPs/sample, accuracy "
              f"{accuracy(original, feeds, y):.4f}, {latency[len(x)]['original']:.3f} ms "
              f"(batch {len(x)}), {latency[1]['original']:.3f} ms (batch 1); the gated file "
              f"stores {doc['params_stored']:,} parameters (the original "
              f"{doc['params_before']:,})\n")
        print(f"| level | budget | params in use | FLOPs in use | error gated | error "
              f"standalone | nesting cost | error standalone refit | accuracy gated | "
              f"accuracy standalone | ms gated (batch {len(x)}) | ms standalone | ms gated "
              f"(batch 1) | ms standalone |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row, err, acc, err_alone, acc_alone, err_refit in rows:
            timed = [latency[b][f"{who} {row.level}"] for b in (len(x), 1)
                     for who in ("level", "alone")]
            print(f"| {row.level} | {row.budget:g} | {row.params:,} | {row.flops:,} | "
                  f"{err:.4f} | {err_alone:.4f} | {err - err_alone:+.4f} | {err_refit:.4f} | "
                  f"{acc:.4f} | {acc_alone:.4f} | "
                  + " | ".join(f"{t:.3f}" for t in timed) + " |", flush=True)
    _slice_cost()
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
