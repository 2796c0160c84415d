"""The ``qmpass`` command line (docs/DESIGN.md, "Interfaces").

Exit codes: 0 done; 2 bad usage or bad input (one line on stderr, nothing written);
1 internal error. Every output file is written atomically after all work succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnx

from hw_targets import TARGET_NAMES
from qmpass.analysis import Analysis, AnalysisConfig, analyze
from qmpass.compress import CompressConfig, Report, compress, compress_gated
from qmpass.compress.sensitivity import PROBE_SECONDS
from qmpass.errors import QmpassInputError
from qmpass.extdata import Payload, data_path, model_payloads
from qmpass.frg import FRGConfig, graph_to_graphml
from qmpass.lower import LowerConfig, lower
from qmpass.modelio import (
    LoadedModel,
    check_outputs,
    load_model,
    write_all_atomic,
    write_atomic,
)
from qmpass.plan.planner import ALLOCATIONS, METHODS
from qmpass.rewrite.gated_lowrank import GATED_INPUT
from qmpass.verify import accuracy, load_calib

__all__ = ["main"]

DEMO_KEEP = 0.5
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "transformer_digits.onnx"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 too; keep it to one line
        self.exit(2, f"qmpass: {message}\n")


def _add_parallel(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--jobs", type=int, default=1,
        help="threads for the per-operator eigendecompositions and Bures angles (default "
        "1: on small models the work is too short to gain; see README)")
    cmd.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="run them on the Dask cluster of this scheduler (e.g. tcp://127.0.0.1:8786); "
        "its workers read the weights from the model file, at the same path")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qmpass", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    analyze_cmd = sub.add_parser("analyze", help="spectral states, QM-FRG and clusters of a model")
    analyze_cmd.add_argument("model", type=Path)
    analyze_cmd.add_argument("--report", type=Path, help="write the JSON report here")
    analyze_cmd.add_argument("--html", type=Path, help="write the HTML report here")
    analyze_cmd.add_argument("--graphml", type=Path, help="write the QM-FRG as GraphML here")
    analyze_cmd.add_argument(
        "--clusters",
        choices=("components", "spectral"),
        default="components",
        help="connected components under the threshold, or spectral clustering of them",
    )
    analyze_cmd.add_argument(
        "--threshold",
        type=float,
        default=FRGConfig.threshold,
        help="largest FS distance (radians) of a QM-FRG edge",
    )
    _add_parallel(analyze_cmd)

    compress_cmd = sub.add_parser(
        "compress", help="plan, rewrite and verify a smaller model (docs/DESIGN.md, Interfaces)"
    )
    compress_cmd.add_argument("model", type=Path)
    compress_cmd.add_argument("-o", "--output", type=Path, required=True,
                              help="where to write the compressed model")
    compress_cmd.add_argument(
        "--method",
        choices=METHODS,
        default="qmfrg",
        help="qmfrg (default); svd: plain truncated SVD; whitened: per-operator whitened "
        "truncation (needs --calib); asvd: activation-aware SVD (needs --calib); magnitude, "
        "random: channel-pruning baselines",
    )
    budget = compress_cmd.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=float,
                        help="fraction (0, 1] of the compressible weight parameters to keep")
    budget.add_argument("--delta", type=float,
                        help="relative-entropy bound per operator or cluster (default 0.05)")
    compress_cmd.add_argument(
        "--tolerance", type=float,
        help="largest relative output error on the held-out calibration inputs. Alone: "
        "the smallest model within it (a search over the budget); with --keep: rollbacks "
        "keep it and the report says how far from the budget it stopped; with --delta or "
        "no budget: default 0.05. --keep alone keeps every planned step")
    compress_cmd.add_argument(
        "--holdout", type=float, default=CompressConfig.holdout,
        help="fraction of the calibration samples that verify instead of fit (default 0.25)")
    compress_cmd.add_argument(
        "--refit", choices=("auto", "on", "off"), default=CompressConfig.refit,
        help="with --calib: refit the low-rank factors on the inputs the compressed model "
        "feeds them; auto keeps whichever verifies better on held-out inputs; off "
        "(default): a refit runs the model once per level of the plan")
    compress_cmd.add_argument(
        "--pricing", choices=("auto", "output", "layer"), default=CompressConfig.pricing,
        help="with --calib and --keep: price each unit by what the model's output feels "
        "of its error, measured by one run of the model per unit (output), or by the "
        "unit's own error (layer); auto (default): output unless those runs are projected "
        f"past {PROBE_SECONDS:.0f} s")
    compress_cmd.add_argument(
        "--allocation", choices=ALLOCATIONS, default=None,
        help="share a --keep budget by the Lagrangian (qmfrg's default) or keep the same "
        "fraction of every operator (uniform: the default of svd and whitened)")
    compress_cmd.add_argument(
        "--strict-budget", action="store_true",
        help="with --keep and --tolerance: exit 2 (nothing written) when the tolerance "
        "stops the model short of --keep by more than 0.03")
    compress_cmd.add_argument(
        "--align", type=int, default=CompressConfig.align,
        help="ranks and kept channel counts are multiples of this (default 8: onnxruntime's "
        "CPU kernels are much slower on odd channel counts; relaxed to 1 where 8 cannot "
        "meet --keep)",
    )
    compress_cmd.add_argument(
        "--convs", choices=("auto", "prune", "factorise"), default="auto",
        help="with --calib, qmfrg prunes conv channel groups or factorises the convs; auto "
        "(default) plans both and keeps the better verified one",
    )
    compress_cmd.add_argument("--calib", type=Path,
                              help=".npz of inputs keyed by graph input name (data-aware)")
    compress_cmd.add_argument(
        "--target", choices=TARGET_NAMES,
        help="budget --keep in this target's predicted cycles instead of weight parameters; "
        "the report gives cycles_before and cycles_after",
    )
    compress_cmd.add_argument(
        "--batch", type=int, default=CompressConfig.batch,
        help="with --target: the batch (a dynamic first dimension) the cycles are "
        "predicted at (default 1)",
    )
    compress_cmd.add_argument(
        "--budgets", metavar="B0,B1,...",
        help="one budget-gated model instead: decreasing keep budgets in (0, 1], one level "
        "each, chosen at run time by the int64 input budget_level (default 0); not with "
        "--keep, --delta or --tolerance (docs/GATED.md)")
    compress_cmd.add_argument("--report", type=Path, help="write the JSON report here")
    _add_parallel(compress_cmd)

    lower_cmd = sub.add_parser(
        "lower", help="emit, simulate and check a model's kernels for an NPU-style target"
    )
    lower_cmd.add_argument("model", type=Path)
    lower_cmd.add_argument("--target", choices=TARGET_NAMES, required=True)
    lower_cmd.add_argument("-o", "--output", type=Path, required=True,
                           help="folder for kernels, headers, build.sh and lowering.json")
    lower_cmd.add_argument("--calib", type=Path,
                           help=".npz of inputs keyed by graph input name (else synthesised)")
    lower_cmd.add_argument("--samples", type=int, default=LowerConfig.samples,
                           help="samples the kernels run on (default 1)")

    demo = sub.add_parser("demo", help="the whole pipeline on the bundled model")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("qmpass-demo"),
        help="folder for the demo's reports (default: ./qmpass-demo)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "compress":
            return _compress(args)
        if args.command == "lower":
            return _lower(args)
        return _demo(args)
    except QmpassInputError as exc:
        print(f"qmpass: {exc}", file=sys.stderr)
        return 2


def _analyze(args: argparse.Namespace) -> int:
    config = AnalysisConfig(
        frg=FRGConfig(threshold=args.threshold), cluster_method=args.clusters,
        jobs=args.jobs, scheduler=args.scheduler,
    )
    loaded = load_model(args.model, spill=True)
    check_outputs({"--report": args.report, "--html": args.html, "--graphml": args.graphml},
                  loaded.files)
    analysis = analyze(loaded, config)
    _write_reports(analysis, report=args.report, html=args.html, graphml=args.graphml)
    _print_summary(analysis)
    return 0


def _compress(args: argparse.Namespace) -> int:
    # a gated model is written as the input was (a large proto's weights are not moved)
    loaded = load_model(args.model, spill=args.budgets is None)
    check_outputs({"-o": args.output, "--report": args.report,
                   "-o (its external data)": data_path(args.output)},
                  [*loaded.files, *([args.calib] if args.calib else [])])
    config = CompressConfig(
        method=args.method,
        keep=args.keep,
        delta=args.delta,
        tolerance=args.tolerance,
        align=args.align,
        convs=args.convs,
        calib=None if args.calib is None else load_calib(args.calib, loaded.proto),
        target=args.target,
        batch=args.batch,
        holdout=args.holdout,
        strict_budget=args.strict_budget,
        refit=args.refit,
        pricing=args.pricing,
        allocation=args.allocation,
        jobs=args.jobs,
        scheduler=args.scheduler,
        budgets=_budgets(args.budgets),
    )
    if config.budgets is not None:
        return _compress_gated(args, loaded, config)
    model, report = compress(loaded, config, keep_external=True)
    _write_compressed(args, loaded, model, report.to_dict())
    _print_compress_summary(report)
    print(f"wrote {args.output}")
    return 0


def _write_compressed(args: argparse.Namespace, loaded: LoadedModel, model: onnx.ModelProto,
                      document: dict[str, Any]) -> None:
    """``-o`` and ``--report``, together and atomically."""
    document["model"] = str(args.model)
    # with external data when the input had it or the output passes 2 GB
    outputs: list[tuple[Path, Payload]] = [*model_payloads(model, args.output, loaded.folder)]
    if args.report is not None:
        outputs.append((args.report, json.dumps(document, indent=1)))
    write_all_atomic(outputs)


def _budgets(text: str | None) -> tuple[float, ...] | None:
    """``--budgets 1,0.75,0.5`` as numbers (None when not given)."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise QmpassInputError(
            f"--budgets must be comma-separated numbers such as 1,0.75,0.5, got '{text}'."
        ) from None


def _compress_gated(args: argparse.Namespace, loaded: LoadedModel,
                    config: CompressConfig) -> int:
    model, report = compress_gated(loaded, config)
    document = report.to_dict()
    _write_compressed(args, loaded, model, document)
    print(report.table())
    print(f"stored parameters {report.params[0]:,} -> {report.params[1]:,} (every level's "
          f"factors and biases, and the weights of operators dense at some level)")
    for note in document["notes"]:
        print(f"qmpass: warning: {note}", file=sys.stderr)
    print(f"wrote {args.output} (input '{GATED_INPUT}': 0 .. {len(report.levels) - 1}, "
          "default 0)")
    return 0


def _lower(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    check_outputs({}, [*loaded.files, *([args.calib] if args.calib else [])],
                  {"-o": args.output})
    calib = None if args.calib is None else load_calib(args.calib, loaded.proto)
    report = lower(loaded, LowerConfig(args.target, calib, args.samples), args.output)
    doc = report.to_dict()
    header = (f"{'operator':<40} {'kernels':>7} {'predicted':>11} {'simulated':>11} "
              f"{'roofline':>10} {'max err':>9} {'bound':>9}")
    print(f"{args.model} on {args.target} ({report.target.dialect}), "
          f"{args.samples} sample(s)")
    print(header)
    print("-" * len(header))
    for op in doc["operators"]:
        print(f"{op['operator'][-40:]:<40} {len(op['kernels']):>7} "
              f"{op['predicted_cycles']:>11,} {op['simulated_cycles']:>11,} "
              f"{op['roofline_cycles']:>10,} {op['max_abs_error']:9.2g} "
              f"{op['error_bound']:9.2g}")
    for skipped in doc["not_lowered"]:
        print(f"not lowered: {skipped['operator']} ({skipped['op_type']}): {skipped['reason']}",
              file=sys.stderr)
    cycles = doc["cycles"]
    print(f"cycles: {cycles['predicted']:,} predicted, {cycles['simulated']:,} simulated; "
          f"outputs within the rounding bound: {doc['all_within_bound']}")
    print(f"wrote {args.output}/ (kernels/, include/, sim_main.cc, build.sh, lowering.json)")
    if not doc["all_within_bound"]:
        print("qmpass: a kernel's output left its rounding bound (a lowering bug); see "
              "lowering.json", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    if not DEFAULT_MODEL.is_file():
        raise QmpassInputError(
            f"the bundled model {DEFAULT_MODEL} is missing; run the demo from a source "
            "checkout installed with `pip install -e .`."
        )
    out: Path = args.out
    check_outputs({}, [DEFAULT_MODEL], {"--out": out})
    analysis = analyze(DEFAULT_MODEL)
    _write_reports(
        analysis,
        report=out / "analysis.json",
        html=out / "analysis.html",
        graphml=out / "qmfrg.graphml",
    )
    _print_summary(analysis)

    calib_path = DEFAULT_MODEL.with_name(DEFAULT_MODEL.stem + "_calib.npz")
    loaded = load_model(DEFAULT_MODEL)
    calib = load_calib(calib_path, loaded.proto) if calib_path.is_file() else None
    config = CompressConfig(keep=DEMO_KEEP, calib=calib)
    print(f"\ncompress --keep {DEMO_KEEP}" + (f" --calib {calib_path.name}" if calib else ""))
    model, report = compress(loaded.proto, config)
    write_atomic(out / "compressed.onnx", model.SerializeToString())
    write_atomic(out / "compress.json", json.dumps(report.to_dict(), indent=1))
    _print_compress_summary(report)

    test_path = DEFAULT_MODEL.with_name(DEFAULT_MODEL.stem + "_test.npz")
    if test_path.is_file():
        with np.load(test_path) as split:
            x, y = split["x"], split["y"]
        name = loaded.proto.graph.input[0].name
        before = accuracy(loaded.proto, {name: x}, y)
        after = accuracy(model, {name: x}, y)
        print(f"held-out accuracy ({len(y)} digits): {before:.4f} before, {after:.4f} after")
    print(f"reports written to {out}/ (analysis.json, analysis.html, qmfrg.graphml, "
          "compressed.onnx, compress.json)")
    return 0


def _write_reports(
    analysis: Analysis, *, report: Path | None, html: Path | None, graphml: Path | None
) -> None:
    """Render everything first, then write: a failure leaves no partial set of files."""
    from qmpass.report import render_html  # matplotlib is imported only when needed

    outputs: list[tuple[Path, str]] = []
    if report is not None:
        outputs.append((report, json.dumps(analysis.to_dict(), indent=1)))
    if html is not None:
        outputs.append((html, render_html(analysis)))
    if graphml is not None:
        outputs.append((graphml, graph_to_graphml(analysis.graph)))
    write_all_atomic(outputs)


def _print_compress_summary(report: Report) -> None:
    header = (f"{'rewrite':<15} {'operators':<44} {'rank/kept':>9} {'params':>17} "
              f"{'pred.err':>8} {'local':>8} {'status':<11}")
    print(header)
    print("-" * len(header))
    for outcome in report.outcomes:
        step = outcome.step
        names = ", ".join(
            _short(name, full=(i == 0)) for i, name in enumerate(step.operators)
        )
        size = (
            f"{len(step.kept or ())}/{step.channels}"
            if step.kind == "prune_channels"
            else str(step.rank)
        )
        params = f"{step.before.params:,} -> {step.after.params:,}"
        tries = f" ({len(outcome.attempts)} variants tried)" if len(outcome.attempts) > 1 else ""
        local = "-" if outcome.local_error is None else f"{outcome.local_error:.2g}"
        print(f"{step.kind:<15} {names[:44]:<44} {size!s:>9} {params:>17} "
              f"{step.predicted_error:8.2g} {local:>8} {outcome.status}{tries}")
    doc = report.to_dict()
    v = report.verification
    print(
        f"parameters {doc['params_before']:,} -> {doc['params_after']:,}; "
        f"weight-operator FLOPs {doc['flops_before']:,} -> {doc['flops_after']:,}; "
        f"kept {doc['keep_achieved']:.3f} of the compressible weights"
    )
    fit = report.fit_verification
    print(
        f"verified on {v.inputs} held-out inputs: relative output error "
        f"{v.relative_error:.4g}, max abs error {v.max_abs_error:.4g}"
        + ("" if fit is None else
           f" (on the {fit.inputs} inputs that fitted the plan: {fit.relative_error:.4g})")
    )
    for note in doc["notes"]:
        print(f"qmpass: warning: {note}", file=sys.stderr)
    if "target" in doc:
        t = doc["target"]
        print(f"predicted {t['name']} cycles of the weight operators (batch {t['batch']}): "
              f"{t['cycles_before']:,} -> {t['cycles_after']:,} "
              f"({t['cycles_before'] / max(t['cycles_after'], 1):.2f}x)")


def _short(name: str, *, full: bool) -> str:
    """``/layers/layers.0/attn/q_proj/MatMul`` -> ``layers.0/attn/q_proj`` (or ``q_proj``)."""
    parts = [p for p in name.split("/") if p]
    if len(parts) > 1:
        parts = parts[:-1]  # the exporter's op-type suffix
    return "/".join(parts[-3:]) if full else parts[-1]


def _print_summary(analysis: Analysis) -> None:
    ops = analysis.operators
    print(
        f"{analysis.model_name}: {len(ops)} weight operators, "
        f"{sum(o.params for o in ops):,} parameters, {sum(o.flops for o in ops):,} FLOPs/sample"
    )
    header = f"{'operator':<44} {'type':<13} {'shape':>11} {'eff.rank':>8} {'q(0.05)':>7}"
    print(header)
    print("-" * len(header))
    for op, state in zip(ops, analysis.states, strict=True):
        shape = f"{op.shape[0]}x{op.shape[1]}"
        print(
            f"{op.name[-44:]:<44} {op.op_type:<13} {shape:>11} "
            f"{state.effective_rank:8.1f} {state.rank_for_delta(0.05):7d}"
        )
    ex = analysis.extraction
    print(
        f"skipped: {len(ex.skipped)}, unsupported: {len(ex.unsupported)}, "
        f"fusion groups: {len(ex.fusion_groups)}, "
        f"QM-FRG edges: {analysis.graph.number_of_edges()}, "
        f"Bures clusters: {len(analysis.clusters)}, "
        f"spectral clusters: {len(analysis.spectral_clusters)}, "
        f"cross-layer candidates: {len(analysis.crosslayer)}"
    )
