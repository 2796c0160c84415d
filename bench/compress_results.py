"""What ``qmpass compress`` gives on the trained fixtures, measured on held-out data.

Four parts, each printed as a Markdown table (``docs/RESULTS.md`` holds one run):

A. **Table 1 of the paper, measured**: the trained CNNs (``resnet_digits`` and its
   BatchNorm variant), top-1 accuracy on the held-out test split at structured sparsity
   0.50/0.70/0.90/0.95 (``--keep 1 - sparsity`` of the prunable operators' weights), for
   ``qmfrg`` (data-aware: the fixture's calibration split), ``magnitude`` and
   ``random`` (mean and spread over seeds), one-shot, no fine-tuning, no rollback
   (``tolerance = inf``: the budget is what is compared), ``align = 1``, and ``qmfrg``
   held to pruning (``convs = "prune"``).
B. **Fidelity vs parameters**: relative output error ``||y' - y||_F / ||y||_F`` of the
   logits on the test split, and accuracy, against the fraction of weight-operator
   parameters kept (measured on the output model), for qmfrg, svd, whitened (the
   per-layer data-aware optimum), magnitude and random; plot in ``--plot``.
C. **Realised speed-up**: onnxruntime latency of the original and the compressed model
   (``qmfrg --keep 0.5`` with calibration), medians of interleaved repeated runs in one
   process, divided by the ideal ratio of weight-operator FLOPs.
D. **Data-aware layers against the whitened optimum**: for each low-rank or shared-basis
   layer of a data-aware plan, the layer's output error on the held-out split divided by
   that of the whitened truncation at the same rank (fitted on the same calibration data).
E. **Scale**: the time ``compress`` takes, stage by stage, on a BERT-base-sized stack
   (``bench/analysis_speed.py``'s, random weights: a speed check only).

Run from the repository root: ``python bench/compress_results.py`` (``--quick`` for a
smaller grid).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from qmpass.compress import CompressConfig, calibration_stats, compress  # noqa: E402
from qmpass.extract import Operator, extract_operators  # noqa: E402
from qmpass.extract.channels import channel_groups  # noqa: E402
from qmpass.modelio import stored_values  # noqa: E402
from qmpass.plan.factors import projection, sqrt_psd  # noqa: E402
from qmpass.plan.planner import Method, PlanConfig, make_plan  # noqa: E402
from qmpass.rewrite.base import name_nodes  # noqa: E402
from qmpass.verify import (  # noqa: E402
    StatsRequest,
    TensorStats,
    accuracy,
    collect_stats,
    compare,
    run_batched,
    session,
)

SPARSITIES = (0.5, 0.7, 0.9, 0.95)
RANDOM_SEEDS = (0, 1, 2, 3, 4)
CNNS = ("resnet_digits", "resnet_digits_bn")
CURVE_MODELS = ("resnet_digits", "transformer_digits")
CURVE_METHODS: tuple[Method, ...] = ("qmfrg", "svd", "whitened", "magnitude", "random")
INF = float("inf")


def _data(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    model = onnx.load(str(models.fixture_path(name)))
    x, y = models.load_test_split(name)
    return model, models.load_calib(name), x, y


def _input(model: onnx.ModelProto) -> str:
    return model.graph.input[0].name


def _run(model: onnx.ModelProto, calib: Mapping[str, np.ndarray] | None, method: Method,
         keep: float, seed: int = 0, align: int = 1,
         convs: Literal["auto", "prune", "factorise"] = "auto"
         ) -> tuple[onnx.ModelProto, dict]:
    """One-shot compression: no rollback, so every method spends the same budget."""
    config = CompressConfig(method=method, keep=keep, calib=calib, tolerance=INF, seed=seed,
                            align=align, convs=convs)
    out, report = compress(model, config)
    return out, report.to_dict()


# -- A ------------------------------------------------------------------------------------------
def table1(sparsities: Sequence[float], seeds: Sequence[int]) -> None:
    print("\n## A. Table 1, measured: top-1 accuracy on the held-out split, one-shot\n")
    for name in CNNS:
        model, calib, x, y = _data(name)
        feeds = {_input(model): x}
        base = accuracy(model, feeds, y)
        print(f"**{name}** ({len(y)} test digits, original accuracy {base:.4f})\n")
        print("| sparsity | qmfrg | magnitude | random (mean ± sd) | kept (qmfrg / baselines) |")
        print("|---|---|---|---|---|")
        for sparsity in sparsities:
            keep = 1.0 - sparsity
            out, rep = _run(model, calib, "qmfrg", keep, convs="prune")
            acc_q = accuracy(out, feeds, y)
            out, rep_m = _run(model, None, "magnitude", keep)
            acc_m = accuracy(out, feeds, y)
            randoms = [accuracy(_run(model, None, "random", keep, seed)[0], feeds, y)
                       for seed in seeds]
            spread = statistics.stdev(randoms) if len(randoms) > 1 else 0.0
            print(f"| {sparsity:.2f} | {acc_q:.4f} | {acc_m:.4f} | "
                  f"{statistics.mean(randoms):.4f} ± {spread:.4f} | "
                  f"{rep['keep_achieved']:.3f} / {rep_m['keep_achieved']:.3f} |")
        print()


# -- B ------------------------------------------------------------------------------------------
def curves(keeps: Sequence[float], plot: Path | None) -> None:
    print("\n## B. Fidelity vs parameters (held-out split)\n")
    results: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for name in CURVE_MODELS:
        model, calib, x, y = _data(name)
        feeds = {_input(model): x}
        reference = run_batched(session(model), feeds)
        ops_before = sum(op.params for op in extract_operators(model).operators)
        results[name] = {}
        print(f"**{name}**: relative logit error / accuracy at the fraction of weight-operator "
              f"parameters kept (original accuracy {accuracy(model, feeds, y):.4f})\n")
        print("| keep asked | " + " | ".join(CURVE_METHODS) + " |")
        print("|---|" + "---|" * len(CURVE_METHODS))
        for keep in keeps:
            cells = []
            for method in CURVE_METHODS:
                out, rep = _run(model, calib, method, keep)
                error = compare(reference, run_batched(session(out), feeds), len(y))
                acc = accuracy(out, feeds, y)
                kept = rep["operator_params_after"] / ops_before
                results[name].setdefault(method, []).append((kept, error.relative_error, acc))
                cells.append(f"{error.relative_error:.3f} / {acc:.3f} @ {kept:.2f}")
            print(f"| {keep:.1f} | " + " | ".join(cells) + " |")
        print()
    if plot is not None:
        _plot(results, plot)
        print(f"plot: {plot}\n")


def _plot(results: Mapping[str, Mapping[str, list[tuple[float, float, float]]]],
          path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7), constrained_layout=True)
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(results))
    for column, (name, by_method) in enumerate(results.items()):
        for method, points in by_method.items():
            kept, error, acc = (np.array(v) for v in zip(*sorted(points), strict=True))
            axes[0, column].plot(kept, error, marker="o", label=method)
            axes[1, column].plot(kept, acc, marker="o", label=method)
        axes[0, column].set_title(name)
        axes[0, column].set_yscale("log")
        axes[0, column].set_ylabel("relative logit error (held-out)")
        axes[1, column].set_ylabel("top-1 accuracy (held-out)")
        for row in range(2):
            axes[row, column].set_xlabel("weight-operator parameters kept")
            axes[row, column].grid(alpha=0.3)
        axes[0, column].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(path))


# -- C ------------------------------------------------------------------------------------------
def speedup(batches: Sequence[int], repeats: int, wide: bool) -> None:
    print("\n## C. Realised speed-up in onnxruntime (--keep 0.5, calibrated)\n")
    print("Whole model: median latency, original over compressed; ideal: the ratio of "
          "weight-operator FLOPs. Kernels: the same ratio over the weight operators' kernels "
          "alone (onnxruntime profiling); share: their part of the original's time; Amdahl: "
          "the whole-model speed-up if those kernels reached the ideal ratio.\n")
    print("| model | method | align | batch | original ms | measured x | ideal x |"
          " measured / ideal | kernels x | kernels / ideal | share | Amdahl x |"
          " measured / Amdahl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases: list[tuple[str, onnx.ModelProto, Mapping[str, np.ndarray], np.ndarray]] = []
    for fixture in models.FIXTURES:
        proto, feeds, inputs, _ = _data(fixture)
        cases.append((fixture, proto, feeds, inputs))
    if wide:
        cases.extend(_wide_models())
    for name, model, calib, x in cases:
        variants: tuple[tuple[Method, int], ...] = (("qmfrg", 8), ("qmfrg", 1), ("svd", 8))
        for method, align in variants:
            out, rep = _run(model, calib, method, 0.5, align=align)
            ideal = rep["flops_before"] / rep["flops_after"]
            operators = [op.name for op in extract_operators(name_nodes(model)).operators]
            for batch in batches:
                reps = int(np.ceil(batch / len(x)))
                feed = {_input(model): np.concatenate([x] * reps)[:batch]}
                t0, t1 = _latency(model, out, feed, repeats)
                k0, total0 = _kernel_time(name_nodes(model), feed, operators)
                k1, _ = _kernel_time(out, feed, operators)
                share = k0 / total0
                amdahl = 1 / ((1 - share) + share / ideal)
                print(f"| {name} | {method} | {align} | {batch} | {t0 * 1e3:.3f} | "
                      f"{t0 / t1:.2f} | {ideal:.2f} | {t0 / t1 / ideal:.2f} | {k0 / k1:.2f} | "
                      f"{k0 / k1 / ideal:.2f} | {share:.2f} | {amdahl:.2f} | "
                      f"{t0 / t1 / amdahl:.2f} |")
    print()


def _kernel_time(model: onnx.ModelProto, feed: Mapping[str, np.ndarray],
                 operators: Sequence[str], runs: int = 50) -> tuple[float, float]:
    """Kernel time of the weight operators (nodes named after an operator of the original:
    rewrites name their nodes ``<operator>/...``) and of all nodes, summed over ``runs``
    profiled runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, dict(feed))
    path = Path(sess.end_profiling())
    events = json.loads(path.read_text())
    shutil.rmtree(path.parent, ignore_errors=True)
    weight = total = 0.0
    prefixes = tuple(operators)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        total += event["dur"]
        # ORT's fusions prefix "fused "; its NCHWc layout pass renames convolutions after
        # their output tensors, so every Conv kernel counts (the fixtures have no
        # convolution without a weight)
        if event["name"].removeprefix("fused ").startswith(prefixes) or \
                event["args"].get("op_name") in ("Conv", "FusedConv"):
            weight += event["dur"]
    return weight, total


def _wide_models() -> list[tuple[str, onnx.ModelProto, dict[str, np.ndarray], np.ndarray]]:
    """The wide MLP of ``models/wide_mlp.py`` (needs the ``models`` extra: torch), for
    matmuls large enough that their FLOPs, not per-node overhead, set the time."""
    try:
        from models import wide_mlp

        model, calib, x_test = wide_mlp.build()
    except ImportError:
        print("(wide MLP skipped: pip install -e '.[models]' for torch)\n")
        return []
    return [(wide_mlp.NAME, model, calib, x_test)]


def _bench_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """Like ``qmpass.verify.session``, but idle worker threads sleep instead of spinning:
    two sessions timed in turn would otherwise steal each other's cores."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _latency(a: onnx.ModelProto, b: onnx.ModelProto, feed: Mapping[str, np.ndarray],
             repeats: int) -> tuple[float, float]:
    """Median latencies of two models, runs interleaved so drift hits both alike."""
    sessions = [_bench_session(a), _bench_session(b)]
    for s in sessions:
        for _ in range(5):
            s.run(None, dict(feed))
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for index, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, dict(feed))
            times[index].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


# -- D ------------------------------------------------------------------------------------------
def against_optimum(keep: float) -> None:
    print("\n## D. Data-aware layers: held-out output error / whitened optimum at the same "
          "rank\n")
    print("Optimum: the whitened truncation of the layer alone, fitted on the same calibration "
          "data, at the same rank and, for shared-basis members, at the rank that spends the "
          "same parameters per member; oracle: fitted on the held-out data itself.\n")
    print("| model | method | step | layer | rank | error / optimum | error / optimum at equal "
          "parameters | error / held-out oracle |")
    print("|---|---|---|---|---|---|---|---|")
    cases: tuple[tuple[str, Method], ...] = (
        ("transformer_digits", "qmfrg"), ("mlp_digits", "qmfrg"), ("resnet_digits", "whitened"))
    for name, method in cases:
        model, calib, x, _ = _data(name)
        named = name_nodes(model)
        extraction = extract_operators(named)
        groups = channel_groups(named)
        ops = {op.name: op for op in extraction.operators}
        calib_stats = _op_stats(named, extraction.operators, calib)
        test_stats = _op_stats(named, extraction.operators, {_input(model): x})
        plan_stats = calibration_stats(named, extraction, groups, method, calib)
        planned = make_plan(extraction, groups, stored_values(named), plan_stats,
                            PlanConfig(method, keep=keep))
        ratios = []
        for step, arrays in zip(planned.plan.steps, planned.tensors, strict=True):
            if step.kind not in ("lowrank", "shared_basis") or step.rank is None:
                continue
            approx = arrays["second"] @ arrays["first"]
            rows = 0
            for member in step.operators:
                op = ops[member]
                d_out = op.shape[0]
                new_w = approx[rows:rows + d_out]
                new_b = arrays["bias"][rows:rows + d_out] if "bias" in arrays else \
                    _bias(op)
                rows += d_out
                held_out = test_stats[op.name]
                ours = _error(op, new_w, new_b, held_out)
                optimum = _error(op, *_whitened(op, step.rank, calib_stats[op.name]), held_out)
                oracle = _error(op, *_whitened(op, step.rank, held_out), held_out)
                members = [ops[m] for m in step.operators]
                d_in = op.shape[1]
                equal = round(step.rank * (d_in + sum(m.shape[0] for m in members))
                              / sum(d_in + m.shape[0] for m in members))
                at_equal = _error(op, *_whitened(op, equal, calib_stats[op.name]), held_out)
                ratios.append(ours / at_equal)
                short = "/".join([p for p in member.split("/") if p][-3:-1]) or member
                print(f"| {name} | {method} | {step.kind} | {short} | {step.rank} | "
                      f"{ours / optimum:.3f} | {ours / at_equal:.3f} (rank {equal}) | "
                      f"{ours / oracle:.3f} |")
        if ratios:
            print(f"| {name} | {method} | | **worst at equal parameters** | | | "
                  f"**{max(ratios):.3f}** | |")
    print()


def _op_stats(model: onnx.ModelProto, operators: Sequence[Operator],
              feeds: Mapping[str, np.ndarray]) -> dict[str, TensorStats]:
    requests = {
        op.name: StatsRequest(op.input, "patches" if op.op_type == "Conv" else "vectors",
                              -1, op.geometry if op.op_type == "Conv" else None)
        for op in operators
        if op.op_type != "Conv" or (op.geometry is not None and op.geometry.groups == 1)
    }
    return collect_stats(model, feeds, requests)


def _bias(op: Operator) -> np.ndarray:
    return np.zeros(op.shape[0]) if op.bias is None else np.asarray(op.bias)


def _whitened(op: Operator, rank: int, stats: TensorStats) -> tuple[np.ndarray, np.ndarray]:
    """The whitened truncation of one layer at ``rank`` with its bias re-fitted."""
    first, second = projection([op.weight], sqrt_psd(stats.cov)).factors(rank)
    approx = second @ first
    return approx, _bias(op) + (op.weight - approx) @ stats.mean


def _error(op: Operator, new_w: np.ndarray, new_b: np.ndarray, stats: TensorStats) -> float:
    """``E ||(W - W') x + (b - b')||^2`` from the second moments of the layer input."""
    dw = op.weight - new_w
    db = _bias(op) - new_b
    return float(np.trace(dw @ stats.second_moment @ dw.T) + 2 * db @ (dw @ stats.mean)
                 + db @ db)


# -- E ------------------------------------------------------------------------------------------
def scale(layers: int) -> None:
    print(f"\n## E. Time to compress a BERT-base-sized stack ({layers} layers, random weights: "
          "a speed check only)\n")
    sys.path.insert(0, str(ROOT / "bench"))
    from analysis_speed import bert_like

    model = bert_like(layers)
    ops = extract_operators(model).operators
    print(f"{len(ops)} weight operators, {sum(op.params for op in ops):,} parameters; "
          "`qmpass.compress(model, CompressConfig(method='svd', keep=0.5, "
          "tolerance=inf))`, 64 synthesised inputs\n")
    print("| stage | seconds |")
    print("|---|---|")
    start = time.perf_counter()
    _, report = _run(model, None, "svd", 0.5)
    for stage, seconds in report["seconds"].items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| **total** | **{time.perf_counter() - start:.1f}** |\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "fidelity.png")
    parser.add_argument("--repeats", type=int, default=200, help="latency runs per model")
    parser.add_argument("--parts", default="ABCDE", help="which parts to run")
    parser.add_argument("--layers", type=int, default=12, help="layers of part E's stack")
    args = parser.parse_args(argv)
    print(f"# qmpass compress results\n\n{platform.platform()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, onnxruntime "
          f"{__import__('onnxruntime').__version__}\n")
    start = time.perf_counter()
    if "A" in args.parts:
        table1(SPARSITIES, RANDOM_SEEDS[:2] if args.quick else RANDOM_SEEDS)
    if "B" in args.parts:
        keeps = (0.2, 0.5, 0.8) if args.quick else tuple(np.round(np.arange(0.1, 0.95, 0.1), 1))
        curves(keeps, args.plot)
    if "C" in args.parts:
        speedup((1, 256), 30 if args.quick else args.repeats, wide=not args.quick)
    if "D" in args.parts:
        against_optimum(0.5)
    if "E" in args.parts:
        scale(2 if args.quick else args.layers)
    print(f"(whole run: {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
