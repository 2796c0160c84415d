"""How fast is ``qmpass.analyze``? Measured against a naive SVD and a Gram lower bound.

Part A, whole-model analysis, for the fixtures in ``models/`` (trained weights) and a
BERT-base-sized encoder stack built here with ``onnx.helper`` (random weights: this is a
speed bench only, random matrices say nothing about compressibility). Per model:

* qmpass: ``qmpass.analyze(proto, AnalysisConfig(progress=False))``, total wall time and
  the split it records in ``analysis.seconds`` (load / extract / spectra / qmfrg);
* naive: full ``np.linalg.svd`` (default arguments: U and V, full matrices) of every
  operator's augmented matrix ``[[W, b], [0, 1]]``;
* bound: ``G = A @ A.T`` on the smaller side of the already-built augmented matrix ``A``
  plus ``scipy.linalg.eigvalsh(G)`` (no finiteness check, G overwritten), and nothing
  else: about the least a method that goes through the Gram matrix can spend.

Augmented matrices for naive and bound are built outside the timer. Every time is the
best (minimum) of the repeats, the qmpass split is that of its best run.

Part B, QM-FRG scale: 10,000 operators made of the fixtures' trained operators and
seeded perturbed copies of them (``W * (1 + noise * N(0, 1))``), their spectral states,
and ``build_qmfrg`` with and without Bures angles.

Run from the repository root: ``python bench/analysis_speed.py`` (tables in Markdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import scipy.linalg
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

import qmpass  # noqa: E402
from qmpass.extract import Operator, extract_operators  # noqa: E402
from qmpass.frg import FRGConfig, build_qmfrg, spectral_edges  # noqa: E402
from qmpass.spectral import augmented_matrix, spectral_state  # noqa: E402

FIXTURES = ("mlp_digits", "resnet_digits", "transformer_digits")
SPLIT_KEYS = ("load", "extract", "spectra", "qmfrg")
GOAL_SPEEDUP = 20.0  # qmpass spectra at least this much faster than the naive SVD
GOAL_BOUND = 1.3  # qmpass spectra within this factor of the Gram lower bound
GOAL_FRG_SECONDS = 5.0  # QM-FRG of 10,000 operators

#: cheap measurements are repeated beyond --repeats while they took under MIN_TIME in all
MIN_TIME = 1.0
MAX_RUNS = 50

T = TypeVar("T")


# -- machine -----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info() -> str:
    """One line naming numpy's BLAS and its thread count."""
    try:
        from threadpoolctl import threadpool_info

        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            p = pools[0]
            return (f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}), "
                    f"{p.get('num_threads')} threads, {Path(p.get('filepath', '')).name}")
    except ImportError:
        pass
    config: Any = np.show_config(mode="dicts")
    blas = config.get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name', '?')} {blas.get('version', '?')} (threads: default)"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# -- timing ------------------------------------------------------------------------------------
def _another_run(runs: int, spent: float, repeats: int, budget: float) -> bool:
    """At least one run; ``repeats`` runs unless ``budget`` seconds are spent; more, up to
    MAX_RUNS, while all of them took less than MIN_TIME (milliseconds-scale timings)."""
    if runs == 0:
        return True
    if runs < repeats:
        return spent < budget
    return runs < MAX_RUNS and spent < MIN_TIME


def best_of(
    fn: Callable[[], T], repeats: int, budget: float = float("inf")
) -> tuple[float, T, int]:
    """Minimum wall time over the calls of ``fn`` (see ``_another_run``), the result of the
    fastest call and the number of calls made."""
    best, result, spent, calls = float("inf"), None, 0.0, 0
    while _another_run(calls, spent, repeats, budget):
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        spent, calls = spent + elapsed, calls + 1
        if elapsed < best:
            best, result = elapsed, out
        del out
    return best, result, calls  # type: ignore[return-value]


def once(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def per_operator_best(
    operators: Sequence[Operator], kernel: Callable[[np.ndarray], object], repeats: int,
    budget: float = float("inf"),
) -> tuple[float, int]:
    """Best over passes (see ``_another_run``) of the summed time of ``kernel(A)`` over all
    operators (each augmented matrix ``A`` built outside the timer), and the passes made."""
    best, spent, passes = float("inf"), 0.0, 0
    while _another_run(passes, spent, repeats, budget):
        total = 0.0
        for op in operators:
            a = augmented_matrix(op.weight, op.bias)
            start = time.perf_counter()
            kernel(a)
            total += time.perf_counter() - start
            del a
        best, spent, passes = min(best, total), spent + total, passes + 1
    return best, passes


def naive_svd(a: np.ndarray) -> object:
    return np.linalg.svd(a)  # U, s, Vh: the naive way to get singular values


def gram_bound(a: np.ndarray) -> object:
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return scipy.linalg.eigvalsh(gram, check_finite=False, overwrite_a=True)


# -- the BERT-base-sized encoder ------------------------------------------------------------------
def bert_like(layers: int, hidden: int = 768, ffn: int = 3072, seed: int = 0) -> onnx.ModelProto:
    """``layers`` encoder layers: Q, K, V, O (hidden x hidden MatMul + bias Add), single-head
    attention, residual, up (hidden x ffn) + Add, Gelu, down (ffn x hidden) + Add, residual.
    LayerNorms are left out (no weights that qmpass analyses). Random float32 weights,
    scaled by 1/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def linear(x: str, name: str, d_in: int, d_out: int) -> str:
        w = (rng.standard_normal((d_in, d_out), dtype=np.float32) / np.sqrt(d_in)).astype(
            np.float32
        )
        b = (0.02 * rng.standard_normal(d_out)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        inits.append(numpy_helper.from_array(b, f"{name}.bias"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}.mm"], name=name))
        nodes.append(
            helper.make_node("Add", [f"{name}.mm", f"{name}.bias"], [f"{name}.out"],
                             name=f"{name}.add")
        )
        return f"{name}.out"

    inits.append(numpy_helper.from_array(np.array(1.0 / np.sqrt(hidden), np.float32), "scale"))
    x = "input"
    for layer in range(layers):
        p = f"layer{layer}"
        q, k, v = (linear(x, f"{p}.{n}", hidden, hidden) for n in ("q", "k", "v"))
        nodes += [
            helper.make_node("Transpose", [k], [f"{p}.kT"], perm=[0, 2, 1]),
            helper.make_node("MatMul", [q, f"{p}.kT"], [f"{p}.scores"]),
            helper.make_node("Mul", [f"{p}.scores", "scale"], [f"{p}.scaled"]),
            helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}.probs", v], [f"{p}.ctx"]),
        ]
        o = linear(f"{p}.ctx", f"{p}.o", hidden, hidden)
        nodes.append(helper.make_node("Add", [x, o], [f"{p}.res1"]))
        up = linear(f"{p}.res1", f"{p}.up", hidden, ffn)
        nodes.append(helper.make_node("Gelu", [up], [f"{p}.act"]))
        down = linear(f"{p}.act", f"{p}.down", ffn, hidden)
        nodes.append(helper.make_node("Add", [f"{p}.res1", down], [f"{p}.res2"]))
        x = f"{p}.res2"
    graph = helper.make_graph(
        nodes, f"bert_like_{layers}l",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


# -- Part A ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelRow:
    name: str
    n_ops: int
    params: int
    total: float
    runs: int
    split: dict[str, float]
    naive: float | None
    naive_runs: int
    bound: float
    bound_runs: int
    edges: int
    bures: int


def measure_model(
    name: str, proto: onnx.ModelProto, repeats: int, naive_repeats: int, budget: float
) -> ModelRow:
    """qmpass, naive and bound on one model; each repeated up to its count, no new repeat
    once ``budget`` seconds were spent on that measurement."""
    config = qmpass.AnalysisConfig(progress=False)
    total, analysis, runs = best_of(lambda: qmpass.analyze(proto, config), repeats, budget)
    graph = analysis.graph
    split = {k: float(analysis.seconds.get(k, float("nan"))) for k in SPLIT_KEYS}
    edges = graph.number_of_edges()
    bures = sum(1 for _, _, d in graph.edges(data=True) if "d_bures" in d)
    del analysis, graph
    operators = extract_operators(proto).operators
    naive, naive_runs = None, 0
    if naive_repeats:
        naive, naive_runs = per_operator_best(operators, naive_svd, naive_repeats, budget)
    bound, bound_runs = per_operator_best(operators, gram_bound, repeats, budget)
    return ModelRow(
        name=name, n_ops=len(operators), params=sum(op.params for op in operators),
        total=total, runs=runs, split=split, naive=naive, naive_runs=naive_runs,
        bound=bound, bound_runs=bound_runs, edges=edges, bures=bures,
    )


def fmt_s(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "n/a"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_x(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "n/a"
    return f"{num / den:.2f}x"


def print_part_a(rows: Sequence[ModelRow]) -> None:
    print("\n### Part A: whole-model analysis\n")
    print("Each time is the best of the runs in parentheses: `--repeats` runs, fewer where they "
          "used up `--budget`, more (up to 50) where all of them took under 1 s. naive and "
          "bound are summed over all operators; the qmpass columns come from the best "
          "`analyze` run (`analysis.seconds`).\n")
    print("| model | ops | params | qmpass total (runs) | load | extract | spectra | qmfrg "
          "| QM-FRG edges (with Bures) | naive SVD (runs) | Gram bound (runs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r.split
        naive = "skipped" if r.naive is None else f"{fmt_s(r.naive)} ({r.naive_runs})"
        print(f"| {r.name} | {r.n_ops} | {r.params:,} | {fmt_s(r.total)} ({r.runs}) "
              f"| {fmt_s(s['load'])} | {fmt_s(s['extract'])} | {fmt_s(s['spectra'])} "
              f"| {fmt_s(s['qmfrg'])} | {r.edges:,} ({r.bures:,}) | {naive} "
              f"| {fmt_s(r.bound)} ({r.bound_runs}) |")
    print("\nRatios. *spectra*: qmpass's `spectra` stage alone, the same work as naive and "
          "bound (singular values of every operator). *total*: the whole `analyze` call, which "
          "also extracts the operators and builds the QM-FRG with its Bures angles.\n")
    print(f"| model | naive / qmpass-spectra (goal >= {GOAL_SPEEDUP:g}x) "
          f"| qmpass-spectra / bound (goal <= {GOAL_BOUND:g}x) "
          "| naive / qmpass-total | qmpass-total / bound |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        spectra = r.split["spectra"]
        print(f"| {r.name} | {fmt_x(r.naive, spectra)} | {fmt_x(spectra, r.bound)} "
              f"| {fmt_x(r.naive, r.total)} | {fmt_x(r.total, r.bound)} |")


def print_goals(rows: Sequence[ModelRow]) -> None:
    print("\n### Goals (from this run)\n")
    for r in rows:
        spectra = r.split["spectra"]
        if r.naive is None:
            speed = "not measured (--skip-naive)"
        else:
            x = r.naive / spectra
            speed = f"{'met' if x >= GOAL_SPEEDUP else 'MISSED'} ({x:.1f}x)"
        y = spectra / r.bound
        bound = f"{'met' if y <= GOAL_BOUND else 'MISSED'} ({y:.2f}x)"
        print(f"* {r.name}: qmpass-spectra >= {GOAL_SPEEDUP:g}x faster than naive: {speed}; "
              f"within {GOAL_BOUND:g}x of the bound: {bound}")


# -- Part B ----------------------------------------------------------------------------------------
def fixture_operators() -> list[Operator]:
    ops: list[Operator] = []
    for name in FIXTURES:
        ops.extend(extract_operators(onnx.load(str(ROOT / "models" / f"{name}.onnx"))).operators)
    return ops


def perturbed_operators(base: Sequence[Operator], count: int, noise: float, seed: int
                        ) -> list[Operator]:
    """The ``base`` operators, then seeded copies ``W * (1 + noise * N(0,1))`` in turn."""
    rng = np.random.default_rng(seed)
    out = list(base)
    k = 0
    while len(out) < count:
        op = base[k % len(base)]
        w = op.weight * (1.0 + noise * rng.standard_normal(op.weight.shape))
        w.setflags(write=False)
        out.append(dataclasses.replace(op, name=f"{op.name}~{k // len(base) + 1}", weight=w))
        k += 1
    return out[:count]


def measure_frg(n_ops: int, noise: float, seed: int) -> tuple[list[tuple[str, str]], float]:
    """Rows of the Part B table, and the time of ``build_qmfrg`` with the default config.
    Every step runs once: each takes seconds, so the run-to-run spread is small beside it."""
    base = fixture_operators()
    start = time.perf_counter()
    operators = perturbed_operators(base, n_ops, noise, seed)
    t_make = time.perf_counter() - start
    t_states, states = once(
        lambda: [spectral_state(op.name, op.weight, op.bias) for op in operators]
    )
    config = FRGConfig()
    rows: list[tuple[str, str]] = [
        ("operators", f"{len(operators):,} ({len(base)} fixture operators and perturbed copies)"),
        ("perturbation of the copies", f"W * (1 + {noise:g} N(0,1)), seed {seed}"),
        ("FRGConfig (default)", ", ".join(f"{k} {v}" for k, v in vars(config).items())),
        ("making the copies (bench, not qmpass)", fmt_s(t_make)),
        ("spectral states: `spectral_state` x N (input of the graph)", fmt_s(t_states)),
    ]
    t_fs, found = once(lambda: spectral_edges(
        states, config.threshold, config.max_neighbors, config.block_rows))
    rows.append(("spectral FS pass alone (all pairs; `qmpass.frg.spectral_edges`)",
                 fmt_s(t_fs)))
    rows.append(("kept pairs: d_FS <= threshold, among max_neighbors closest",
                 f"{len(found[0]):,}"))
    del found
    t_nob, graph = once(
        lambda: build_qmfrg(operators, states, dataclasses.replace(config, bures=False))
    )
    rows.append(("`build_qmfrg(FRGConfig(bures=False))`", fmt_s(t_nob)))
    rows.append(("edges", f"{graph.number_of_edges():,}"))
    del graph
    t_full, graph = once(lambda: build_qmfrg(operators, states, config))
    bures = sum(1 for _, _, d in graph.edges(data=True) if "d_bures" in d)
    del graph
    rows.append(("`build_qmfrg(FRGConfig())` (with Bures)", fmt_s(t_full)))
    rows.append(("Bures computations", f"{bures:,}"))
    rows.append(("Bures stage: pair selection + angles (difference of the builds)",
                 fmt_s(t_full - t_nob)))
    return rows, t_full


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=12,
                        help="encoder layers of the BERT-sized model (default 12; 0 leaves it out)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each measurement, best taken (default 3)")
    parser.add_argument("--bert-naive-repeats", type=int, default=1,
                        help="runs of the slow naive SVD on the BERT-sized model (default 1)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds after which a measurement starts no further run "
                             "(default 30)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive SVD")
    parser.add_argument("--frg-ops", type=int, default=10_000,
                        help="operators of the QM-FRG scale test (default 10000; 0 leaves it out)")
    parser.add_argument("--noise", type=float, default=0.01,
                        help="relative perturbation of the copies in Part B (default 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.bert_naive_repeats, args.layers, args.frg_ops) < 0:
        parser.error("--repeats must be >= 1 and the counts >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    shown = sys.argv[1:] if argv is None else list(argv)
    print("## qmpass analysis speed\n")
    print(f"* command: `python bench/{Path(__file__).name}{''.join(' ' + a for a in shown)}`")
    print(f"* CPU: {cpu_model()}; os.cpu_count() = {os.cpu_count()}")
    print(f"* BLAS: {blas_info()}")
    print(f"* python {platform.python_version()}, numpy {np.__version__}, "
          f"scipy {scipy.__version__}, onnx {onnx.__version__}, qmpass {qmpass.__version__}")
    print(f"* load average at start (1/5/15 min): {load_average()}")

    # warm-up (imports, BLAS thread pool, first-call costs), not timed
    qmpass.analyze(str(ROOT / "models" / "mlp_digits.onnx"), qmpass.AnalysisConfig(progress=False))

    specs: list[tuple[str, Callable[[], onnx.ModelProto], int]] = [
        (name, lambda n=name: onnx.load(str(ROOT / "models" / f"{n}.onnx")), args.repeats)
        for name in FIXTURES
    ]
    if args.layers:
        specs.append((f"bert_like ({args.layers} layers, random)",
                      lambda: bert_like(args.layers, seed=args.seed), args.bert_naive_repeats))
    rows = []
    for name, build, naive_repeats in specs:
        proto = build()
        rows.append(measure_model(name, proto, args.repeats,
                                  0 if args.skip_naive else naive_repeats, args.budget))
        del proto
        print(f"  [{time.perf_counter() - started:.0f} s] measured {name}", file=sys.stderr)
    print_part_a(rows)

    t_frg = None
    if args.frg_ops:
        frg_rows, t_frg = measure_frg(args.frg_ops, args.noise, args.seed)
        print(f"  [{time.perf_counter() - started:.0f} s] measured the QM-FRG", file=sys.stderr)
        print("\n### Part B: QM-FRG scale (each step run once)\n")
        print("| quantity | value |")
        print("|---|---:|")
        for key, value in frg_rows:
            print(f"| {key} | {value} |")

    print_goals(rows)
    if t_frg is not None:
        verdict = "met" if t_frg < GOAL_FRG_SECONDS else "MISSED"
        print(f"* QM-FRG of {args.frg_ops:,} operators in < {GOAL_FRG_SECONDS:g} s: {verdict} "
              f"({t_frg:.2f} s, `build_qmfrg` with Bures)")
    print(f"\n* load average at end (1/5/15 min): {load_average()}")
    print(f"* bench wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
